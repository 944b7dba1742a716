"""Learning curve: MT-bench acceptance length (tau) against training tokens, for drafts trained on nested
subsets of generated data.

    # the data, once: fused features serve both drafts (EAGLE-2 training reads only the last layer)
    python allocation.py --output-dir lc_data --end 1200 --script generate_data_fused_features.py -- --max-length 640
    python benchmark/bench_learning_curve.py --data sharegpt=lc_data
    # another kind of data beside it, e.g. the target's own greedy replies to the same user turns
    python generate_data_fused_features.py --replies greedy --end 160 --max-length 640 --output-dir lc_greedy
    python benchmark/bench_learning_curve.py --data sharegpt=lc_data greedy=lc_greedy --conversations 100
    # a recipe variant: arguments after -- go to every training command; --tag names its cells
    python benchmark/bench_learning_curve.py --data sharegpt=lc_data --archs eagle3 --conversations 500 \
        --tag vocab32k --result benchmark/results/recipe_vocab32k.json -- --draft-vocab-size 32000

Each cell (data kind x draft x conversations) is a real training run (train/train_eagle_ttt.py for EAGLE-3,
train/train.py for EAGLE-2, with --train-conversations N) of EPOCHS passes over its N conversations, evaluated on
the same held-out conversations (simulated tau). Then one process loads the target once, decodes the prompt set
(--prompts, default MT-bench) with plain greedy decoding and with every cell's draft (our decoder, lossless: each
output is compared with plain greedy's) and records tau. A cell with more conversations than the data holds is
skipped and named. Finished trainings and measurements are kept under OUT, one measurement file per prompt set: a
rerun (or a bigger grid, or another --prompts on the same cells) only does what is missing.
Writes RESULT (.json + .png).

    # the same cells on code prompts: nothing is retrained
    python benchmark/bench_learning_curve.py --data sharegpt=lc_data --prompts humaneval --questions 8 \
        --result benchmark/results/learning_curve_humaneval.json
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.io import atomic_write_text
from modules.draft import kinds as draft_kinds
from modules.paths import DEFAULT_DATA_DIR, REPO_ROOT
from modules.settings import like, parse_settings, setting
from modules.training.settings import TrainingSettings

TTT_STEPS = 4                  # EAGLE-3 unrolled steps (the demo's; official 7)


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--conversations 125 250); --config FILE reads them from a JSON/YAML
# file; arguments after `--` go to every training command.
@dataclass
class Settings:
    data: list[str] = setting([f"sharegpt={DEFAULT_DATA_DIR}"], "NAME=FOLDER of generated data, one or more "
                                                               "(fused features for EAGLE-3 cells)")
    archs: list[str] = setting(["eagle3", "eagle2"], "draft kinds to train", choices=draft_kinds.KINDS)
    conversations: list[int] = setting([125, 250, 500, 1000], "training conversations per cell (nested subsets of "
                                                              "one split)")
    epochs: float = like(TrainingSettings, "epochs", 2, help="passes over each cell's conversations: training tokens "
                                                              "grow with the data")
    eval_conversations: int = setting(20, "held out, the same for every cell of a data kind")
    max_length: int = like(TrainingSettings, "max_length", 640)
    lr: float = like(TrainingSettings, "lr")
    grad_accum: int = like(TrainingSettings, "grad_accum")
    prompts: str = setting("mt-bench", "prompt set the drafts decode (benchmark/prompt_sets.py: mt-bench, humaneval, "
                                       "sharegpt-heldout): every turn of each question")
    questions: int = setting(6, "questions of the prompt set (MT-bench: both turns each)")
    max_new_tokens: int = setting(96, "tokens generated per turn")
    tree: list[int] = setting([8, 4, 2], "total tokens, depth, top-k (the demo's tree)", nargs=3,
                              metavar=("TOTAL", "DEPTH", "TOP_K"))
    hybrid_lookup: int = setting(8, "> 0: also measure the hybrid tree (EAGLE + a prompt-lookup branch of N tokens)")
    seed: int = setting(0, "seed of the split and the drafts")
    output_dir: str = setting(str(REPO_ROOT / "outputs" / "learning_curve"), "cells' training runs and measurements",
                              aliases=["--out"])
    result: str = setting("benchmark/results/learning_curve.json", "result file (.json + .png)")
    model: str | None = setting(None, "target (None: embedded SmolLM2-135M-Instruct)")
    report_only: bool = setting(False, "train and measure nothing: report the planned cells that are done, name the "
                                       "others", action="store_true")
    tag: str = setting("", "suffix of the cells' names (a recipe variant beside the default one)")
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    """The settings, with args.data as {name: folder} and args.train_args = the arguments after `--`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parse_settings(Settings, argv[:cut], description=__doc__.splitlines()[0])
    kinds = {}
    for spec in args.data:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            print(f"error: --data {spec!r}: expected NAME=FOLDER, e.g. sharegpt=lc_data", file=sys.stderr)
            raise SystemExit(2)
        kinds[name] = folder
    args.data = kinds
    args.train_args = argv[cut + 1:]
    return args


# ---- the grid ---------------------------------------------------------------------------------

def plan_cells(args):
    """Every cell with what it trains on: its folder, eval fraction, trained tokens per epoch; and the
    cells skipped (more conversations than the data holds)."""
    from modules.data.storage import DataFormatError, EagleDataset
    from modules.training.setup import split

    cells, skipped = [], []
    for kind, folder in args.data.items():
        try:
            ds = EagleDataset(folder, read_aux=False)
        except (DataFormatError, FileNotFoundError) as e:
            sys.exit(f"error: --data {kind}={folder}: {e}")
        if len(ds) <= args.eval_conversations:
            sys.exit(f"error: --data {kind}={folder}: {len(ds)} conversations, not more than "
                     f"--eval-conversations {args.eval_conversations}")
        eval_fraction = args.eval_conversations / len(ds)
        available = len(ds) - args.eval_conversations
        for arch in args.archs:
            draft_kind = draft_kinds.get(arch)
            if draft_kind.fused_features and not ds.has_aux:
                skipped.append(f"{kind} {arch}: {folder} has no fused features ({draft_kind.data_script})")
                continue
            for n in args.conversations:
                if n > available:
                    skipped.append(f"{kind} {arch} {n}: the data holds {available} training conversations")
                    continue
                train_ds, _ = split(ds, eval_fraction, args.seed, n)
                tokens = trained = 0
                for ids, mask in ds.token_pairs(train_ds.indices):
                    tokens += min(len(ids), args.max_length)
                    trained += int(mask[:args.max_length].sum())
                name = f"{kind}-{arch}-{n}" + (f"-{args.tag}" if args.tag else "")
                cells.append({"name": name, "data": kind, "arch": arch, "conversations": n,
                              "folder": folder, "eval_fraction": eval_fraction, "tokens_per_epoch": tokens,
                              "trained_tokens_per_epoch": trained,
                              "training_tokens": round(trained * args.epochs)})
    return cells, skipped


def train_command(args, cell):
    steps_per_epoch = -(-cell["conversations"] // args.grad_accum)
    return [sys.executable, *draft_kinds.get(cell["arch"]).train_command(TTT_STEPS), "--data", cell["folder"],
            "--output-dir", str(Path(args.output_dir) / cell["name"]),
            "--train-conversations", str(cell["conversations"]),
            "--eval-fraction", f"{cell['eval_fraction']:.8f}", "--epochs", str(args.epochs),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--batch-size", "1",
            "--grad-accum", str(args.grad_accum), "--seed", str(args.seed),
            "--save-steps", str(max(20, steps_per_epoch // 2)), "--logging-steps", str(max(1, steps_per_epoch // 10)),
            "--resume", "auto", *(["--model", args.model] if args.model else []), *args.train_args]


# ---- tau on the prompt set of every trained cell, one target load ---------------------------------

def set_key(prompts: str) -> str:
    """The prompt set's name in result keys and file names: mt_bench, humaneval, sharegpt_heldout, a file's stem."""
    return Path(prompts).stem.replace("-", "_").replace(".", "_")


def tau_key(prompts: str) -> str:
    """The result key of the drafts' tau on a prompt set (mt_bench_tau, humaneval_tau, ...)."""
    return f"{set_key(prompts)}_tau"


def prompt_turns(target, tokenizer, args):
    """[(question id, turn, prompt ids, plain greedy tokens, seconds)] of the prompt set, each turn following
    plain greedy decoding's answer."""
    from tqdm import tqdm

    from benchmark.methods import run_plain
    from benchmark.mt_bench import conversation, prompt_ids
    from benchmark.prompt_sets import load_prompt_set

    questions, _ = load_prompt_set(args.prompts, args.questions)
    eos = tokenizer.eos_token_id
    run_plain(target, prompt_ids(tokenizer, conversation(["Say hello."], [])), 8, eos)  # warm-up
    turns = []
    for q in tqdm(questions, desc="plain greedy"):
        answers = []
        for t in range(len(q["turns"])):
            ids = prompt_ids(tokenizer, conversation(q["turns"][:t + 1], answers))
            tokens, sec, _ = run_plain(target, ids, args.max_new_tokens, eos)
            turns.append((q["question_id"], t + 1, ids, tokens, sec))
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return turns


def measure_cell(args, cell, target, turns, eos):
    """The cell's draft decoding every turn, alone and (with --hybrid-lookup) with a prompt-lookup branch:
    tau, speed against plain, outputs equal to plain greedy."""
    from benchmark.bench_eagle import Settings as EagleBench, draft_vocab_ids, resolve_draft_dir
    from benchmark.methods import run_eagle, summarize
    from modules.decode.parallel import make_decoder
    from modules.draft.kinds import kind_of
    from modules.draft.loading import load_draft
    from modules.placement import output_device
    from modules.target import pick_dtype

    draft_dir = resolve_draft_dir(Path(args.output_dir) / cell["name"])
    device = output_device(target)
    draft = load_draft(draft_dir, target_model=target, dtype=pick_dtype("auto", device)).to(device).eval()
    kind = kind_of(draft)
    # EAGLE-1/2: the full-vocabulary head restricted as bench_eagle.py does by default
    vocab_ids = None if kind.own_vocab else draft_vocab_ids(EagleBench().draft_vocab, cell["folder"],
                                                            draft.lm_head.weight.shape[0], eos)[0]
    total, depth, top_k = args.tree
    adapter = kind.tree_adapter(draft, vocab_ids)
    # a parallel kind proposes its trained block in one forward (the tree shape does not apply to it)
    decoders = {"eagle": make_decoder(target, adapter, total, depth, top_k, timing=True)}
    if args.hybrid_lookup > 0:
        decoders["hybrid"] = make_decoder(target, adapter, total, depth, top_k, timing=True,
                                          lookup_tokens=args.hybrid_lookup)
    records = [{"method": "plain", "question_id": qid, "turn": turn, "new_tokens": len(plain_tokens),
                "seconds": plain_s, "matches_plain": True} for qid, turn, _, plain_tokens, plain_s in turns]
    for name, decoder in decoders.items():
        run_eagle(target, turns[0][2][:16], 8, eos, decoder=decoder)  # warm-up
        for qid, turn, ids, plain_tokens, _ in turns:
            tokens, sec, extra = run_eagle(target, ids, args.max_new_tokens, eos, decoder=decoder)
            records.append({"method": name, "question_id": qid, "turn": turn, "new_tokens": len(tokens),
                            "seconds": sec, "matches_plain": tokens == plain_tokens, **extra})
    summary = summarize(records, decoders["eagle"].depth)
    out = {"measured_with": measure_settings(args), "turns": len(turns)}
    for name, prefix in (("eagle", ""), ("hybrid", "hybrid_")):
        if name in summary:
            s = summary[name]
            out |= {prefix + tau_key(args.prompts): s["tau"], f"{prefix}speedup": s["speedup"],
                    f"{prefix}matched_plain": s["matched_plain"],
                    f"{prefix}draft_ms_per_cycle": s["draft_ms_per_cycle"]}
    return out


def measure_settings(args):
    """What a cell's measurement depends on besides its draft: a change re-measures."""
    settings = {"questions": args.questions, "max_new_tokens": args.max_new_tokens, "tree": list(args.tree),
                "hybrid_lookup": args.hybrid_lookup}
    if args.prompts != "mt-bench":  # MT-bench measurements made before --prompts existed stay valid
        settings["prompts"] = args.prompts
    return settings


def measurement_file(args, cell) -> Path:
    return Path(args.output_dir) / cell["name"] / f"{set_key(args.prompts)}.json"


def measured(args, cell):
    path = measurement_file(args, cell)
    return path.is_file() and json.loads(path.read_text()).get("measured_with") == measure_settings(args)


def measure(args, cells):
    """Tau on the prompt set of every trained cell not measured yet (kept as OUT/<cell>/<set>.json)."""
    todo = [c for c in cells if not measured(args, c)]
    if not todo:
        return
    from modules.target import load_target

    target, tokenizer = load_target(args.model, dtype="fp32")
    eos = tokenizer.eos_token_id
    print(f"{args.prompts}: {args.questions} questions (every turn), {args.max_new_tokens} new tokens, "
          "plain greedy first")
    turns = prompt_turns(target, tokenizer, args)
    tau = tau_key(args.prompts)
    for cell in todo:
        t = time.time()
        m = measure_cell(args, cell, target, turns, eos)
        hybrid = (f"; + lookup {args.hybrid_lookup}: tau {m['hybrid_' + tau]:.3f}, {m['hybrid_speedup']:.2f}x, "
                  f"{m['hybrid_matched_plain']}/{m['turns']}") if "hybrid_" + tau in m else ""
        print(f"{cell['name']}: {args.prompts} tau {m[tau]:.3f}, {m['speedup']:.2f}x plain, "
              f"{m['matched_plain']}/{m['turns']} outputs = plain greedy{hybrid} ({time.time() - t:.0f} s)", flush=True)
        atomic_write_text(measurement_file(args, cell), json.dumps(m, indent=2))


# ---- report -----------------------------------------------------------------------------------

def collect(args, cells):
    rows = []
    for cell in cells:
        run = Path(args.output_dir) / cell["name"]
        if args.report_only and not ((run / "summary.json").is_file() and measured(args, cell)):
            continue
        summary = json.loads((run / "summary.json").read_text())
        mt = {k: v for k, v in json.loads(measurement_file(args, cell).read_text()).items() if k != "measured_with"}
        rows.append({k: v for k, v in cell.items() if k != "folder"} | {"prompts": args.prompts,
            "steps": summary.get("steps"), "train_runtime_s": summary.get("train_runtime_s"),
            "eval_top1_acc": summary.get("eval_top1_acc"), "eval_tau_sim": summary.get("eval_tau_sim"), **mt})
    return rows


def print_table(rows, tau):
    """tau: the rows' tau key (<set>_tau)."""
    short = "MT tau" if tau == "mt_bench_tau" else "tau"
    print(f"\n{'data':<10} {'draft':<7} {'convs':>6} {'train tokens':>13} {'steps':>6} {'train s':>8} "
          f"{'eval top1':>9} {'sim tau':>8} {short:>7} {'speed':>6} {'= plain':>8} {'hybrid tau':>10} {'speed':>6}")
    for r in rows:
        hybrid = (f" {r['hybrid_' + tau]:>10.3f} {r['hybrid_speedup']:>5.2f}x"
                  if "hybrid_" + tau in r else "")
        print(f"{r['data']:<10} {r['arch']:<7} {r['conversations']:>6} {r['training_tokens']:>13,} {r['steps']:>6} "
              f"{r['train_runtime_s'] or 0:>8.0f} {r['eval_top1_acc']:>9.3f} {r['eval_tau_sim']:>8.3f} "
              f"{r[tau]:>7.3f} {r['speedup']:>5.2f}x {r['matched_plain']:>4}/{r['turns']}{hybrid}")


def plot(rows, path, title, prompts="mt-bench"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tau = tau_key(prompts)
    lines = sorted({(r["data"], r["arch"]) for r in rows})
    for i, (kind, arch) in enumerate(lines):
        rs = sorted((r for r in rows if (r["data"], r["arch"]) == (kind, arch)), key=lambda r: r["training_tokens"])
        x = [r["training_tokens"] for r in rs]
        color = f"C{i}"
        ax.plot(x, [r[tau] for r in rs], "o-", color=color, label=f"{arch}, {kind} replies: {prompts}")
        ax.plot(x, [r["eval_tau_sim"] for r in rs], "s--", color=color, alpha=0.6, label=f"{arch}, {kind}: simulated")
        if all("hybrid_" + tau in r for r in rs):
            ax.plot(x, [r["hybrid_" + tau] for r in rs], "^:", color=color,
                    label=f"{arch}, {kind}: {prompts}, + prompt-lookup branch")
        for r in rs:
            ax.annotate(f"{r['conversations']}", (r["training_tokens"], r[tau]), fontsize=8,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (loss-masked tokens x epochs; labels: conversations)")
    ax.set_ylabel("acceptance length tau (tokens per target forward)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from modules.stages import run_stage
    from modules.target import model_display_name

    args = parse_args(argv)
    cells, skipped = plan_cells(args)
    for s in skipped:
        print(f"skipped: {s}")
    if not cells:
        sys.exit("error: no cell to run (see 'skipped' above)")
    print(f"{len(cells)} cells: " + ", ".join(c["name"] for c in cells))
    try:
        for cell in cells if not args.report_only else []:
            run_stage(cell["name"], train_command(args, cell), Path(args.output_dir) / ".done")
        if not args.report_only:
            measure(args, cells)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    rows = collect(args, cells)
    done = {r["name"] for r in rows}
    skipped += [f"{c['data']} {c['arch']} {c['conversations']}: not run" for c in cells if c["name"] not in done]
    if not rows:
        sys.exit("error: no finished cell to report")
    print_table(rows, tau_key(args.prompts))
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "result", "data", "model")}
    # names, not machine paths
    settings["data"] = sorted(args.data)
    settings["model"] = Path(model_display_name(args.model)).name
    result = {"settings": settings, "skipped": skipped, "cells": rows}
    out = Path(args.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    total, depth, top_k = args.tree
    plot(rows, out.with_suffix(".png"), f"Learning curve: SmolLM2-135M target, {args.epochs:g} epochs per cell, "
                                        f"tree {total}/{depth}/{top_k}, {args.questions} {args.prompts} questions "
                                        "(every turn)", args.prompts)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
