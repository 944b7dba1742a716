"""Multi-node rehearsal on one machine (docs/gpu.md, "Several nodes"), on CPU with gloo:

- data: `allocation.py --num-shards 2 --shard-index {0,1}` (one run per "node") writes disjoint row ranges
  into part-* folders of one output folder, which then trains as one set;
- training: two `torchrun --nnodes 2 --nproc_per_node 1 --node-rank {0,1} --master-addr 127.0.0.1` processes
  (the static rendezvous of the docs' command, c10d store on 127.0.0.1), for train/train.py (EAGLE-1/2)
  and train/train_eagle_ttt.py (EAGLE-3): one world of 2 ranks, so an epoch takes half the optimizer steps
  of one process, and both ranks end with the same weights.
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests._helpers_data import tiny_target_dir
from tests._helpers_eagle import REPO_ROOT

ROWS = REPO_ROOT / "tests" / "data" / "gpu_conversations.jsonl"
# Part of `make test` (~1 min of wall time on the 2-core machine); `make test-multinode` runs it alone.
N_ROWS = 24


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def node_data(tmp_path_factory):
    """{script: data folder} written by two allocation.py "nodes" (one CPU worker each)."""
    base = tmp_path_factory.mktemp("multinode")
    model = tiny_target_dir(base / "model", layers=4)
    out = {}
    for script in ("generate_data.py", "generate_data_fused_features.py"):
        folder = base / script.removesuffix(".py")
        for node in (0, 1):
            cmd = [sys.executable, "allocation.py", "--outdir", str(folder), "--dataset", str(ROWS), "--end",
                   str(N_ROWS), "--workers", "1", "--num-shards", "2", "--shard-index", str(node), "--script",
                   script, "--", "--model", model, "--max-length", "256", "--no-progress", "--threads", "1"]
            r = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
        out[script] = folder
    return model, out


def test_two_nodes_write_disjoint_rows_that_cover_the_range(node_data):
    _, folders = node_data
    for folder in folders.values():
        parts = sorted(folder.glob("part-*"))
        assert [p.name for p in parts] == ["part-0000", "part-0001"]
        ranges = [(m["start_row"], m["end_row"]) for m in
                  (json.loads((p / "manifest.json").read_text()) for p in parts)]
        assert ranges == [(0, N_ROWS // 2), (N_ROWS // 2, N_ROWS)]


def _two_nodes(script, argv, tmp_path):
    """Run `script` as two torchrun nodes of one process each; (node 0's stdout, rank weights dumped)."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(REPO_ROOT / script), *argv]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait(timeout=300)
        log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    for (p, _), text in zip(procs, logs):
        assert p.returncode == 0, text[-3000:]
    return logs[0]


@pytest.mark.parametrize("script", ["train/train.py", "train/train_eagle_ttt.py"])
def test_two_node_training_is_one_world(node_data, tmp_path, script):
    model, folders = node_data
    eagle3 = script.endswith("ttt.py")
    data = folders["generate_data_fused_features.py" if eagle3 else "generate_data.py"]
    out = tmp_path / "run"
    argv = ["--model", model, "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--grad-accum", "1",
            "--eval-fraction", "0.1", "--max-length", "256", "--logging-steps", "2", "--save-steps", "100",
            "--precision", "fp32"]
    argv += ["--ttt-steps", "2"] if eagle3 else ["--dump-rank-weights"]
    _two_nodes(script, argv, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    n_eval = max(1, round(0.1 * N_ROWS))
    assert summary["steps"] == math.ceil((N_ROWS - n_eval) / 2), summary  # 2 ranks: half the steps of one
    assert (out / "draft" / "config.json").is_file()
    if not eagle3:  # both nodes' ranks hold the same weights
        w0, w1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
        assert set(w0) == set(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)
