"""benchmark/bench_ttt_attention.py end to end at tiny shapes: both variants run in their own
process, agree on the loss and gradient norm (same weights and inputs), and the results are saved."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import bench_ttt_attention  # noqa: E402


@pytest.mark.parametrize("attention_only", [False, True])
def test_tiny_run_writes_side_by_side_figures(tmp_path, capsys, attention_only):
    out = tmp_path / "ttt.json"
    argv = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--draft-vocab", "50",
            "--target-vocab", "100", "--seq-len", "48", "--steps", "3", "--threads", "1", "--out", str(out)]
    argv += ["--attention-only"] if attention_only else []
    assert bench_ttt_attention.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"].endswith(" ".join(argv)) and result["settings"]["steps"] == 3
    eager, sdpa = result["variants"]["eager"], result["variants"]["sdpa"]
    assert eager["loss"] == pytest.approx(sdpa["loss"], rel=1e-5)
    assert eager["grad_norm"] == pytest.approx(sdpa["grad_norm"], rel=1e-4)
    for r in (eager, sdpa):
        assert r["step_s"] > 0 and r["process_peak_gb"] >= r["process_before_gb"] > 0 and r["step_peak_gb"] > 0
        assert r["device"] == "cpu"
    assert out.with_suffix(".png").is_file()
    assert "eager" in capsys.readouterr().out
