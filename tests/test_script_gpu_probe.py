"""benchmark/gpu_probe.py (`make gpu-probe`) on its tiny shape on CPU: every stage runs through the code
users run (generate_folder, train_eagle_ttt.py for EAGLE-3 and P-EAGLE, both decoders) and reports its
figures and profiler tables; on the lent GPU the same script runs at Llama-3.1-8B's shapes."""
import json

from benchmark import gpu_probe


def test_tiny_probe_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "out"
    rc = gpu_probe.main(["--shape", "tiny", "--device", "cpu", "--output-dir", str(out)])
    report = json.loads((out / "gpu_probe.json").read_text())
    assert rc == 0 and report["stages_failed"] == [], report["stages_failed"]
    data = report["data"]
    assert data["conversations"] == gpu_probe.SHAPES["tiny"]["rows"] and data["tokens"] > 0
    assert data["loop_tokens_per_s"] > 0 and data["forward_tokens_per_s"] > 0
    for arch, ttt in (("eagle3", 7), ("peagle", 4)):
        run = report["train"][arch]
        assert run["steps"] == gpu_probe.SHAPES["tiny"]["train_steps"] and run["ttt_steps"] == ttt
        assert run["tokens_per_s"] > 0  # from the log windows after the profiled steps
    decode = report["decode"]
    assert decode["eagle3"]["decoder"] == "EagleDecoder" and decode["peagle"]["decoder"] == "ParallelDecoder"
    assert decode["eagle3"]["cycles"] > 0 and decode["eagle3"]["ms_per_cycle"] > 0
    for name in ("data", "train_eagle3", "train_peagle", "decode"):
        assert "aten::" in (out / f"profile_{name}.txt").read_text(), name
    assert "/tmp" not in json.dumps(report)  # no machine paths in the report


def test_a_failing_stage_is_reported_and_later_stages_say_why(tmp_path):
    """The control: a probe whose training cannot run names the failure and exits non-zero."""
    out = tmp_path / "out"
    rc = gpu_probe.main(["--shape", "tiny", "--device", "cpu", "--output-dir", str(out), "--stages", "train",
                         "decode"])
    report = json.loads((out / "gpu_probe.json").read_text())
    assert rc == 1
    assert report["stages_failed"] == ["train: not run (needs an earlier stage)",
                                       "decode: not run (needs an earlier stage)"]
