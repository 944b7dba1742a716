"""The demo's stages end to end at a toy size (the full `make demo` is not run in CI)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = ["--rows", "4", "--workers", "2", "--max-length", "256", "--steps", "2", "--grad-accum", "1",
       "--questions", "1", "--max-new-tokens", "8"]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    """The toy demo without the vLLM stages (they run in `make demo` when .venv-vllm exists; the report's vLLM
    section is tested on faked files in tests/test_demo_report.py)."""
    return subprocess.run([sys.executable, "demo.py", "--out", str(out), *TOY, "--vllm-python", str(out / "no-vllm")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def test_demo_pipeline_end_to_end_and_rerun_skips_finished_stages(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    report = (out / "report.md").read_text()
    for section in ("## Data", "## Training", "## Benchmark", "## Served by vLLM: not run here",
                    "## Beside it: the real engine (vllm 0.32.0"):
        assert section in report
    assert "`make install-vllm && make demo`" in report
    assert "median of 3 interleaved round(s)" in report  # the benchmark's default rounds
    # the default kind, named by the registry (P-EAGLE's export shares EAGLE-3's class name); no machine path
    assert "- draft: peagle (LlamaForCausalLMEagle3) in demo/train/draft" in report
    assert str(tmp_path) not in report
    manifests = sorted(out.glob("data/part-*/manifest.json"))
    assert len(manifests) == 2  # one folder per CPU worker
    assert sum(json.loads(m.read_text())["rows_written"] for m in manifests) > 0
    assert (out / "train" / "draft" / "config.json").is_file()
    assert (out / "train" / "training_curves.png").stat().st_size > 0

    bench = json.loads((out / "benchmark" / "results.json").read_text())["summary"]
    assert set(bench) >= {"plain", "eagle", "eagle + lookup 8"}
    assert all(len(m["rounds"]) == 3 and m["rounds_agree"] for m in bench.values())
    # Lossless: every EAGLE output (plain trees and hybrid trees) equals plain greedy decoding.
    for method in ("eagle", "eagle + lookup 8"):
        assert bench[method]["matched_plain"] == bench[method]["runs"] > 0
    assert bench["eagle"]["tau"] >= 1.0

    # Rerun with the same settings: every stage is skipped, the report is rebuilt.
    second = run_demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier") == 3
