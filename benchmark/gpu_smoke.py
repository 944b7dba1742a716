"""`make gpu-smoke`: the one prepared check for a machine with a GPU (docs/gpu.md).

    python benchmark/gpu_smoke.py            # or: make gpu-smoke (make gpu-smoke GPU_PY=python3 without .venv)

1. installs the wheels carried in wheels/ or shared/wheels/ (pip --no-deps), if any;
2. runs the CUDA tests (tests/test_gpu.py, marker gpu);
3. an end-to-end run on a tiny target built from a config (hidden 256, 8 layers) and the committed
   conversations tests/data/gpu_conversations.jsonl: EAGLE-3 data (bf16 target, batched by tokens),
   EAGLE-3 training for 200 steps, and the decoder benchmark (fp32, lossless check against plain greedy);
4. prints one summary: what passed, what failed, what could not run, tokens/s of data generation and
   training, the decoder's tau and speedup.

Needs only torch, transformers, accelerate, safetensors, tqdm, pytest (no datasets, no gguf, no network).
Without matplotlib the plots are skipped (said in the summary). Without CUDA it prints "no CUDA" and exits
with 1: it checks the GPU paths and has no CPU fallback (their logic runs on CPU in `make test`, and
`EAGLE_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py` runs the GPU tests' bodies on CPU).
Budget: under 8 minutes on one H200 (steps 2 and 3 have their own time limits).
"""
import glob
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the lent machine has no editable install of this repo (no .venv travels)
from modules.settings import parse_settings, setting  # noqa: E402

ROWS = REPO / "tests" / "data" / "gpu_conversations.jsonl"
DEVICE = "cuda"


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag; --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    train_steps: int = setting(200, "EAGLE-3 training steps of the end-to-end run")
    test_timeout_s: int = setting(300, "time limit of the CUDA tests (tests/test_gpu.py), seconds")
# ----------------------------------------------------------------------------- end of SETTINGS


def install_wheels(report):
    wheels = sorted(glob.glob(str(REPO / "wheels" / "*.whl")) + glob.glob(str(REPO / "shared" / "wheels" / "*.whl")))
    if not wheels:
        report["wheels"] = "none carried"
        return
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels],
                       capture_output=True, text=True)
    report["wheels"] = f"{len(wheels)} installed" if r.returncode == 0 else f"install FAILED: {r.stderr[-300:]}"


def run_gpu_tests(report, timeout_s):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEP", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        report["gpu tests"] = f"TIMED OUT after {timeout_s} s"
        return
    out = r.stdout + r.stderr
    reported = [line for line in out.splitlines()
                if re.search(r"(bf16 vs fp32|outputs equal plain greedy|losses|host syncs per cycle|^FAILED|^ERROR)",
                             line)]
    print("\n".join(reported))
    last = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    report["gpu tests"] = last[-1].strip("= ") if last else f"no summary (exit {r.returncode}): {out[-500:]}"


def without_matplotlib(report):
    """The scripts draw PNGs with matplotlib; where it is missing the drawing is skipped, nothing else."""
    if importlib.util.find_spec("matplotlib") is not None:
        return
    from benchmark import bench_eagle
    from modules.training import curves

    curves.plot_training_curves = lambda *a, **k: None
    bench_eagle.plot = lambda *a, **k: None
    report["plots"] = "skipped (no matplotlib)"


def end_to_end(report, train_steps):
    import torch

    from tests._helpers_data import tiny_target_dir

    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    model = tiny_target_dir(work / "model", hidden=256, layers=8, tie=False)
    without_matplotlib(report)

    import generate_data_fused_features
    t = time.time()
    rc = generate_data_fused_features.main(["--model", model, "--dataset", str(ROWS), "--outdir", str(work / "data"),
                                            "--max-length", "1024", "--device", DEVICE, "--dtype", "bf16",
                                            "--no-progress"])
    manifest = json.loads((work / "data" / "manifest.json").read_text()) if rc == 0 else {}
    report["data"] = ("FAILED" if rc else
                      f"ok, {manifest['tokens'] / (time.time() - t):,.0f} tokens/s ({manifest['tokens']:,} tokens, "
                      f"{manifest['rows_written']} conversations, incl. start-up)")
    if rc:
        return

    from train import train_eagle_ttt
    out = work / "run"
    rc = train_eagle_ttt.main(["--model", model, "--data", str(work / "data"), "--output-dir", str(out),
                               "--max-steps", str(train_steps), "--ttt-steps", "3", "--batch-size", "4",
                               "--grad-accum", "1", "--lr", "1e-3", "--eval-fraction", "0.1", "--save-steps", "100",
                               "--logging-steps", "20", "--max-length", "1024", "--attn", "sdpa"])
    if rc:
        report["train"] = f"FAILED (exit {rc})"
        return
    history = json.loads((out / "log_history.json").read_text())
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    rates = rates[1:] or rates  # the first log holds the start-up
    losses = [h["loss"] for h in history if "loss" in h]
    loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "not logged"
    summary = json.loads((out / "summary.json").read_text())
    report["train"] = (f"ok, {train_steps} steps, {sum(rates) / max(len(rates), 1):,.0f} tokens/s, loss "
                       f"{loss}, eval tau_sim {summary.get('eval_tau_sim', '-')}")
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    from benchmark import bench_eagle
    bench = work / "bench.json"
    try:
        bench_eagle.main(["--model", model, "--draft", str(out / "draft"), "--device", DEVICE, "--dtype", "fp32",
                          "--num-questions", "4", "--max-new-tokens", "64", "--total-tokens", "16", "--depth", "4",
                          "--top-k", "4", "--hybrid-lookup", "8", "--out", str(bench)])
    except SystemExit as err:
        if err.code not in (None, 0):
            report["decoder"] = f"FAILED: {err.code}"
            return
    rows = json.loads(bench.read_text())["summary"]
    parts = []
    for name, s in rows.items():
        if s.get("tau") is not None:
            parts.append(f"{name}: tau {s['tau']:.2f}, {s['speedup']:.2f}x plain, "
                         f"{s['matched_plain']}/{s['runs']} equal plain greedy")
    plain = rows.get("plain", {})
    report["decoder"] = f"plain {plain.get('tokens_per_s', 0):.1f} tokens/s; " + "; ".join(parts)


def main(argv=None):
    import torch

    settings = parse_settings(Settings, argv, description=__doc__.splitlines()[0])

    if not torch.cuda.is_available():
        print("gpu-smoke: no CUDA (torch.cuda.is_available() is False): nothing was run. This check needs a GPU; "
              "see docs/gpu.md (on CPU, `make test` runs the same logic and reports the gpu tests skipped).")
        return 1
    t0 = time.time()
    report = {"device": f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"}
    install_wheels(report)
    run_gpu_tests(report, settings.test_timeout_s)
    try:
        end_to_end(report, settings.train_steps)
    except Exception:  # the summary must still come out, saying what broke
        report["end-to-end"] = "CRASHED: " + traceback.format_exc(limit=3)[-1500:]
    report["wall time"] = f"{time.time() - t0:.0f} s"
    for stage in ("gpu tests", "data", "train", "decoder"):
        report.setdefault(stage, "NOT RUN (an earlier stage failed)")
    print("\n==== gpu-smoke summary ====")
    for key, value in report.items():
        print(f"{key:>11}: {value}")
    failed = any(str(v).startswith(("FAILED", "CRASHED", "TIMED", "NOT RUN", "no summary")) or " failed" in str(v)
                 for v in report.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
