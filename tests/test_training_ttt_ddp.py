"""TTT training under DDP (2 CPU processes, gloo): the unrolled draft runs through the wrapped
model's forward, so gradients are all-reduced. Both ranks end with the same weights, equal to one
process that sees the same global batch, for EAGLE-3 (stored and online features) and the
EAGLE-1/2 arch. The worker is tests/_worker_ttt_ddp.py."""
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests import _worker_ttt_ddp as worker
from tests._helpers_eagle import REPO_ROOT

# DDP vs one process: the same gradients summed in another order (float32), after 3 Adam steps at
# lr 1e-2. Measured: <= 6e-6; unsynchronised ranks (the bug this guards against) differ by 4e-2.
ATOL = 5e-5


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _read(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def test_ttt_ddp_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "tests" / "_worker_ttt_ddp.py"), str(tmp_path / "ddp"), "1"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for setup in worker.SETUPS:  # the 1-process reference: batch 2 instead of 2 ranks x batch 1
        worker.run(tmp_path / "one", 2, setup)

    for setup in worker.SETUPS:
        (w0, m0), (w1, m1) = (_read(tmp_path / "ddp" / f"{setup}-rank{r}.safetensors") for r in (0, 1))
        ref, m_ref = _read(tmp_path / "one" / f"{setup}-rank0.safetensors")
        assert m0["world_size"] == m1["world_size"] == "2" and m_ref["world_size"] == "1"
        assert m0["global_step"] == m1["global_step"] == m_ref["global_step"] == str(worker.STEPS)
        assert set(w0) == set(w1) == set(ref) and len(w0) > 0
        for name in w0:
            assert torch.equal(w0[name], w1[name]), f"{setup} {name}: ranks differ"
            diff = (w0[name] - ref[name]).abs().max().item()
            assert diff <= ATOL, f"{setup} {name}: DDP vs one process differ by {diff}"
        # the check is not vacuous: training moved the weights by much more than the tolerance
        moved = max((ref[n] - init).abs().max().item() for n, init in _initial_weights(setup).items())
        assert moved > 100 * ATOL, setup
        # metrics are reduced across ranks once per log (one log here), not at every micro-step
        assert m0["all_reduce_calls"] == m1["all_reduce_calls"] == "1", setup


def _initial_weights(setup):
    """The draft's trained weights before training (the worker's seeded initialisation)."""
    from tests._helpers_eagle3 import tiny_target

    draft = worker.make_draft(setup, tiny_target())
    return {n: p.detach() for n, p in draft.named_parameters() if p.requires_grad}
