"""`make demo`: the whole pipeline on the embedded default, on a CPU, with a report at the end.

    python demo.py                                    # same as `make demo`
    python demo.py --rows 1000 --steps 2000           # bigger (make demo DEMO_ROWS=1000 DEMO_STEPS=2000)
    python demo.py --out /tmp/tiny --rows 6 --steps 4 --questions 1 --max-new-tokens 16   # smoke run
    make install-vllm && make demo                    # adds the vLLM stages to a finished demo (the rest is skipped)

Stages, each a plain script a user can run by hand (the demo prints every command):
  1. data       allocation.py over CPU workers -> the kind's generator (the registry, modules/draft/kinds.py,
                decides): generate_data_fused_features.py (P-EAGLE, EAGLE-3, DFlash) or generate_data.py
                (EAGLE-2): ShareGPT rows -> SmolLM2 features
  2. train      train/train_eagle_ttt.py --arch KIND (fused features, training-time test or a parallel block,
                draft vocab); evaluated with top-1 accuracy and simulated tau
  3. benchmark  benchmark/bench_eagle.py: plain greedy vs prompt lookup vs the draft vs the draft + a
                prompt-lookup branch (hybrid) on MT-bench, in 3 interleaved rounds (median, range)
  4. export     train/export.py --hybrid-lookup N (only with .venv-vllm, `make install-vllm`)
  5. vllm       benchmark/bench_vllm.py with .venv-vllm's python on that export: vLLM plain, n-gram, the draft
                and the hybrid (the draft + this repo's prompt-lookup rule, modules/vllm_plugin/); without
                .venv-vllm the report says the command that adds it
  6. report     OUT/report.md + PNG plots, also printed

The time budget: 30 minutes on an idle 2-core CPU. Data and training take ~23 of them (2026-12-04: 317 s + 1,037 s).
The benchmark runs 3 rounds of 4 questions x 2 turns x 48 tokens: as many generated tokens as the one round of
6 x 2 x 96 it replaced (~3 min), now with a spread. The vLLM stage starts a fresh engine per method (~35 s each on 2
idle cores): one round of 3 first turns x 64 tokens, ~3.5 min with the export (estimated); more rounds do not fit,
and the report says so.

P-EAGLE is the default because it measured fastest here: against EAGLE-3 on the same engine data and the same
training steps it reached a lower tau but drafts its whole block in one forward (3 ms a cycle against 11), so it
decoded faster in our decoder (alone and hybrid) and in vLLM (benchmark/README.md, "Head to head on the engine
data"). --arch eagle3 trains the sequential EAGLE-3 draft instead.

Rerunning skips the stages that finished with the same settings; after Ctrl-C (or a crash) each
stage resumes: data by shards, training from its last checkpoint, the benchmark from scratch.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmark.bench_vllm import Settings as VllmBench
from benchmark.rounds import RoundsSettings
from modules.draft import kinds as draft_kinds
from modules.paths import REPO_ROOT
from modules.stages import run_stage
from modules.settings import like, parse_settings, setting
from modules.training.settings import TrainingSettings, TTTSettings


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--rows 1000); field max_new_tokens is flag --max-new-tokens.
@dataclass
class Settings:
    output_dir: str = setting("demo_out", "everything the demo writes goes here", aliases=["--out", "--outdir"])
    arch: str = setting("peagle", "draft kind (modules/draft/kinds.py): peagle (a block of 4 in one forward), eagle3 "
                                  "(fused features + TTT + draft vocab), dflash, eagle2",
                        choices=draft_kinds.KINDS)
    ttt_steps: int = like(TTTSettings, "ttt_steps", 4, help="unrolled steps of a sequential kind (EAGLE-3: official 7; "
                                                             "each costs a draft forward)")
    rows: int = setting(600, "ShareGPT rows turned into training data")
    workers: int = setting(2, "CPU processes for data generation (threads are split between them)")
    max_length: int = like(TrainingSettings, "max_length", 640, help="tokens per conversation (shorter than the 2048 "
                                                                     "default: CPU time)")
    steps: int = setting(320, "optimizer steps of draft training (x --grad-accum conversations each)")
    batch_size: int = like(TrainingSettings, "batch_size")
    grad_accum: int = like(TrainingSettings, "grad_accum")
    lr: float = like(TrainingSettings, "lr")
    questions: int = setting(4, "MT-bench questions in the benchmark (both turns each)")
    max_new_tokens: int = setting(48, "tokens generated per turn (x 3 rounds: the work one round of 6 x 2 x 96 was)")
    rounds: int = like(RoundsSettings, "rounds")
    tree: list[int] = setting([8, 4, 2], "total tokens, depth, top-k: small trees suit a 2-core CPU "
                                         "(bench_eagle.py --sweep)", nargs=3, metavar=("TOTAL", "DEPTH", "TOP_K"))
    hybrid_lookup: int = setting(8, "also benchmark EAGLE trees with a prompt-lookup branch of this many tokens "
                                    "(verified in the same forward; 0 = off)")
    eval_fraction: float | None = setting(None, "held-out share of conversations (default: enough for ~10 of them)")
    vllm_python: str = setting(".venv-vllm/bin/python", "vLLM's python (`make install-vllm`; relative to the repo). "
                                                         "Present: the demo exports the draft and serves it in vLLM "
                                                         "(stages export, vllm); absent: the report says how to add it")
    vllm_questions: int = setting(3, "vLLM stage: MT-bench first turns")
    vllm_max_new_tokens: int = setting(64, "vLLM stage: tokens generated per prompt")
    vllm_rounds: int = like(RoundsSettings, "rounds", 1,
                            help="vLLM stage: interleaved rounds; every method of every round starts a fresh engine "
                                 "(~35 s each on 2 cores), so one round is what fits the demo's 30 minutes")
    hybrid_min_match: int = like(VllmBench, "hybrid_min_match")
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.splitlines()[0])


def vllm_python(args) -> Path | None:
    """.venv-vllm's python when it is installed (the vLLM stages run), else None."""
    path = REPO_ROOT / args.vllm_python
    return path if path.is_file() else None


def spec_tokens(args) -> int:
    """Draft tokens per vLLM cycle: a parallel kind's trained block (the trainer's default, the demo does not set
    it), else the tree's depth (a chain that long)."""
    kind = draft_kinds.get(args.arch)
    return draft_kinds.ParallelOptions().parallel_tokens if kind.parallel else args.tree[1]


def stage_commands(args) -> dict[str, list[str]]:
    """The command line of every stage; a stage is redone when its command changes."""
    out = Path(args.output_dir)
    py = sys.executable
    eval_fraction = args.eval_fraction or min(0.5, max(0.02, 10 / max(args.rows, 1)))
    kind = draft_kinds.get(args.arch)  # the registry decides the data script and the trainer
    generator, trainer = kind.data_script, kind.train_command(args.ttt_steps)
    return {
        "data": [py, "allocation.py", "--outdir", str(out / "data"), "--end", str(args.rows),
                 "--workers", str(args.workers), "--script", generator, "--", "--max-length", str(args.max_length)],
        "train": [py, *trainer, "--data", str(out / "data"), "--output-dir", str(out / "train"),
                  "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--grad-accum", str(args.grad_accum), "--lr", str(args.lr),
                  "--max-length", str(args.max_length), "--eval-fraction", f"{eval_fraction:.3f}",
                  "--save-steps", str(max(20, args.steps // 10)), "--eval-steps", str(max(1, args.steps // 4)),
                  "--logging-steps", str(max(1, args.steps // 30)),
                  "--resume", "auto"],
        "benchmark": [py, "benchmark/bench_eagle.py", "--draft", str(out / "train" / "draft"),
                      "--num-questions", str(args.questions), "--max-new-tokens", str(args.max_new_tokens),
                      "--total-tokens", str(args.tree[0]), "--depth", str(args.tree[1]), "--top-k", str(args.tree[2]),
                      "--hybrid-lookup", str(args.hybrid_lookup), "--draft-vocab-data", str(out / "data"),
                      "--rounds", str(args.rounds), "--out", str(out / "benchmark" / "results.json")],
    } | vllm_commands(args)


def vllm_commands(args) -> dict[str, list[str]]:
    """The export and vLLM stages, when .venv-vllm is installed: the draft exported with the hybrid field
    (train/export.py --hybrid-lookup; fp32, the target's dtype here) and served by benchmark/bench_vllm.py."""
    vllm = vllm_python(args)
    if vllm is None:
        return {}
    out = Path(args.output_dir)
    return {
        "export": [sys.executable, "train/export.py", "--checkpoint", str(out / "train" / "draft"),
                   "--output-dir", str(out / "export"), "--hybrid-lookup", str(args.hybrid_min_match),
                   "--dtype", "fp32"],
        "vllm": [str(vllm), "benchmark/bench_vllm.py", "--draft", str(out / "export"),
                 "--methods", "plain", "ngram", "draft", "hybrid", "--hybrid-min-match", str(args.hybrid_min_match),
                 "--num-spec-tokens", str(spec_tokens(args)), "--num-questions", str(args.vllm_questions),
                 "--max-new-tokens", str(args.vllm_max_new_tokens), "--rounds", str(args.vllm_rounds),
                 "--dtype", "fp32", "--out", str(out / "vllm" / "results.json")],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from modules.demo_report import write_report

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    try:
        for name, cmd in stage_commands(args).items():
            seconds[name] = run_stage(name, cmd, out / ".done")
    except KeyboardInterrupt:
        print("\ninterrupted: rerun `make demo` (same settings) to resume where it stopped", file=sys.stderr)
        return 130
    report = write_report(out, seconds)
    print("\n" + report)
    print(f"report written to {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
