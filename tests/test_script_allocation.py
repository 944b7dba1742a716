"""allocation.py: slices cover the range exactly; an end-to-end CPU run on the embedded SmolLM2."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import allocation
from modules.data.features import target_features
from modules.data.storage import EagleDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("start,end,parts", [(0, 10, 3), (5, 6, 4), (0, 17671, 8), (100, 107, 7)])
def test_split_range_no_gap_no_overlap(start, end, parts):
    slices = allocation.split_range(start, end, parts)
    assert slices[0][0] == start and slices[-1][1] == end
    assert all(a < b for a, b in slices) and all(b == a2 for (_, b), (a2, _) in zip(slices, slices[1:]))
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1 and len(slices) == min(parts, end - start)
    with pytest.raises(ValueError):
        allocation.split_range(3, 3, 2)


def test_nodes_and_workers_partition_the_range():
    covered = []
    for node in range(3):
        args = allocation.Settings(start=10, end=110, num_shards=3, shard_index=node, workers=4, gpus=None)
        plan = allocation.worker_plan(args)
        covered += [(w["start"], w["end"]) for w in plan]
        assert all(w["threads"] >= 1 and w["env"]["CUDA_VISIBLE_DEVICES"] == "" for w in plan)
        assert [w["index"] for w in plan] == [node * 4 + k for k in range(4)]
    rows = [r for a, b in covered for r in range(a, b)]
    assert rows == list(range(10, 110))
    assert allocation.parse_gpu_groups(["0,1", "2,3"]) == [[0, 1], [2, 3]]


def test_cpu_engine_workers_bind_their_own_cores(monkeypatch):
    """vLLM's automatic CPU binding puts every engine on the same cores; each --engine vllm CPU worker gets
    its own share instead. Control: the HF path (and a user's own binding) are left alone."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(allocation.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    plan = allocation.worker_plan(allocation.Settings(start=0, end=8, workers=2, gpus=None, engine="vllm"))
    assert [w["env"]["VLLM_CPU_OMP_THREADS_BIND"] for w in plan] == ["0,1", "2,3"]
    assert [w["threads"] for w in plan] == [2, 2]
    (one,) = allocation.worker_plan(allocation.Settings(start=0, end=8, workers=1, gpus=None, engine="vllm"))
    assert one["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2,3"
    hf = allocation.worker_plan(allocation.Settings(start=0, end=8, workers=2, gpus=None))
    assert all("VLLM_CPU_OMP_THREADS_BIND" not in w["env"] for w in hf)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3")
    assert allocation.worker_plan(allocation.Settings(start=0, end=8, workers=2, gpus=None,
                                                      engine="vllm"))[1]["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "3"


def test_failed_worker_is_reported(tmp_path):
    # A stand-in generator (no torch import: fast): the worker starting at row 2 fails with exit code 3.
    script = tmp_path / "fake_generator.py"
    script.write_text("import sys\nargs = sys.argv[1:]\nprint('args', args)\n"
                      "sys.exit(3 if args[args.index('--start') + 1] == '2' else 0)\n")
    r = subprocess.run([sys.executable, "allocation.py", "--workers", "2", "--start", "0", "--end", "4",
                        "--script", str(script), "--outdir", str(tmp_path / "out"), "--", "--max-length", "64"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "worker 1 (rows 2-4) failed with exit code 3" in r.stderr and "worker-0001.log" in r.stderr
    assert "worker 0" not in r.stderr and "rerun the same command to resume" in r.stderr
    log = (tmp_path / "out" / "logs" / "worker-0000.log").read_text()
    assert "'--index', '0'" in log and "'--max-length', '64'" in log and "'--threads'" in log  # flags passed on


def test_end_to_end_two_cpu_workers_on_smollm2(tmp_path, smollm2):
    out = tmp_path / "data"
    cmd = [sys.executable, "allocation.py", "--workers", "2", "--start", "0", "--end", "4",
           "--outdir", str(out), "--", "--max-length", "160", "--dtype", "fp32"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # Rerunning the same command resumes: a lost shard is recomputed byte for byte, the rest is kept.
    (lost,) = (out / "part-0001").glob("shard-*.safetensors")
    (kept,) = (out / "part-0000").glob("shard-*.safetensors")
    lost_bytes, kept_mtime = lost.read_bytes(), kept.stat().st_mtime_ns
    lost.unlink()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert lost.read_bytes() == lost_bytes and kept.stat().st_mtime_ns == kept_mtime
    assert sorted(p.name for p in out.glob("part-*")) == ["part-0000", "part-0001"]
    ds = EagleDataset(out)
    assert [m["start_row"] for m in ds.manifests] == [0, 2] and [m["end_row"] for m in ds.manifests] == [2, 4]
    assert ds.model_name == "smollm2-135m-instruct" and ds.hidden_size == 576
    assert sorted(ds[i]["row_id"] for i in range(len(ds))) == [r for r in range(4) if r in ds.row_ids.tolist()]
    assert len(ds) >= 3  # ShareGPT rows 0-3: at most one is skipped

    model, _ = smollm2
    for i in range(len(ds)):
        item = ds[i]
        assert item["hidden_states"].dtype == torch.bfloat16 and len(item["input_ids"]) <= 160
        fresh, _ = target_features(model, item["input_ids"][None])
        # Stored in bf16: equal to the fresh fp32 forward within bf16 rounding (2^-8 relative).
        torch.testing.assert_close(item["hidden_states"].float(), fresh[0], rtol=2 ** -7, atol=1e-2)
        assert item["loss_mask"].sum() > 0 and item["loss_mask"][0] == 0
