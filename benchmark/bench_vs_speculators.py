"""Side by side: our EAGLE-3 trainer against vLLM's `speculators` 0.9.0 trainer, at equal data and steps.

    make install-speculators                                  # once: .venv-speculators, CPU-patched (opt-in)
    python benchmark/bench_vs_speculators.py --data lc_data   # trains both, measures both, writes the result
    python benchmark/bench_vs_speculators.py --data lc_data --ours outputs/learning_curve/sharegpt-eagle3-250
    python benchmark/bench_vs_speculators.py --data lc_data --only speculators &   # the peer in a second process

Both trainers get the learning-curve cell's conversations (benchmark/bench_learning_curve.py: the same split, so the
same training and held-out conversations), our token ids, loss masks and capture layers, and the same draft
vocabulary (ids and size: ours, counted by our trainer, handed to speculators as d2t/t2d). Ours is the cell's
training command (train/train_eagle_ttt.py --arch eagle3 --ttt-steps 4, lr 3e-4, grad-accum 4, 2 epochs), or a run
folder given with --ours. speculators trains with its own defaults (Muon + AdamW at 1e-3, 3 TTT steps, forward KL,
frozen lm_head, EAGLE-3.1 norms, packed batches) except: its device plumbing (benchmark/peers/patch_speculators.py),
--loss-implementation eager, --draft-attn-impl sdpa and --num-workers 0 (CPU), the same number of optimizer steps as
ours (--max-steps: its LR schedule decays over them) and about the same tokens per step (--total-seq-len: the
training tokens of one epoch / our steps per epoch, so ~4 conversations a packed batch). Its last hidden state is
the target's BEFORE the final norm; ours is after: post / norm weight (benchmark/peers/speculators_format.py), checked
on one conversation against a real forward of the target (recorded under "pre_norm_check").

Then both drafts are measured the same way by our code: our loader reads speculators' checkpoint (layers.0.* ->
midlayer.*, with its norm_before_residual / norm_before_fc / norm_output), the held-out conversations give per-step
accuracy, EAL and simulated tau (our trainer's evaluation), and our lossless decoder gives tau on the prompt set
(MT-bench), every output compared with plain greedy decoding. Training wall time and tokens/s (the training tokens
of the cell's epochs over the trainer process's wall time) are recorded for both. Writes RESULT (JSON) and prints
a table. Finished stages are kept under OUT: a rerun resumes.
"""
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.paths import REPO_ROOT
from modules.settings import parse_settings, setting

PEER = "speculators"
OURS = "ours"


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--conversations 125); --config FILE reads them from a JSON/YAML file;
# arguments after `--` go to speculators' trainer (python -m speculators.train ...).
@dataclass
class Settings:
    data: str = setting("lc_data", "fused-feature data folder (EAGLE-3), as bench_learning_curve.py --data NAME=...")
    conversations: int = setting(250, "training conversations (the learning-curve cell)")
    eval_conversations: int = setting(20, "held out (the learning-curve split)")
    epochs: float = setting(2, "passes over the conversations (ours; speculators gets the same optimizer steps)")
    max_length: int = setting(640, "tokens per conversation")
    lr: float = setting(3e-4, "our peak learning rate (speculators keeps its own)")
    grad_accum: int = setting(4, "our micro-batches per optimizer step")
    seed: int = setting(0, "seed of the split and of both trainers")
    ours: str | None = setting(None, "a finished run folder of ours to reuse (the cell's: draft/ and summary.json); "
                                     "None = train it under OUT")
    peer_python: str = setting(".venv-speculators/bin/python", "python of speculators' virtualenv "
                                                               "(make install-speculators)")
    peer_tokens_per_step: int | None = setting(None, "speculators' --total-seq-len; None = one epoch's training "
                                                     "tokens / our steps per epoch")
    concurrent: bool = setting(False, "train speculators while ours trains (faster; their wall times and tokens/s "
                                      "then are not a speed comparison)", action="store_true")
    only: str | None = setting(None, "train only this trainer and stop (e.g. speculators in a second process while "
                                     "the full run trains ours: the full run then finds it done)",
                               choices=[OURS, PEER])
    prompts: str = setting("mt-bench", "prompt set both drafts decode (benchmark/prompt_sets.py)")
    questions: int = setting(6, "questions of the prompt set (both turns each)")
    max_new_tokens: int = setting(96, "tokens generated per turn")
    tree: list[int] = setting([8, 4, 2], "total tokens, depth, top-k (the demo's tree)", nargs=3,
                              metavar=("TOTAL", "DEPTH", "TOP_K"))
    out: str = setting(str(REPO_ROOT / "outputs" / "vs_speculators"), "both runs, the converted data, measurements",
                       aliases=["--output-dir"])
    result: str = setting("benchmark/results/vs_speculators.json", "result file (JSON)")
    model: str | None = setting(None, "target (None: embedded SmolLM2-135M-Instruct)")
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parse_settings(Settings, argv[:cut], description=__doc__.splitlines()[0])
    args.peer_args = argv[cut + 1:]
    return args


def lc_settings(args):
    """bench_learning_curve's settings for the one cell (the same split, training command and decoding)."""
    from benchmark import bench_learning_curve as lc

    argv = ["--data", f"sharegpt={args.data}", "--archs", "eagle3", "--conversations", str(args.conversations),
            "--eval-conversations", str(args.eval_conversations), "--epochs", str(args.epochs),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--grad-accum", str(args.grad_accum),
            "--seed", str(args.seed), "--out", args.out, "--prompts", args.prompts, "--questions",
            str(args.questions), "--max-new-tokens", str(args.max_new_tokens), "--tree", *map(str, args.tree),
            "--hybrid-lookup", "0", *(["--model", args.model] if args.model else [])]
    lc_args = lc.parse_args(argv)
    cells, skipped = lc.plan_cells(lc_args)
    if not cells:
        sys.exit("error: " + "; ".join(skipped))
    return lc_args, cells[0]


def splits(args, cell):
    """(dataset with fused features, training rows, held-out rows): bench_learning_curve's split."""
    from modules.data.storage import EagleDataset
    from modules.training.setup import split

    ds = EagleDataset(args.data, read_aux=True)
    train_ds, eval_ds = split(ds, cell["eval_fraction"], args.seed, args.conversations)
    return ds, list(train_ds.indices), list(eval_ds.indices)


# ---- ours -----------------------------------------------------------------------------------------

def run_ours(args, lc_args, cell):
    """(run folder, training wall s, steps) of our draft: the cell's training command, or --ours."""
    from benchmark import bench_learning_curve as lc
    from modules.stages import run_stage

    if args.ours:
        run = Path(args.ours)
        if not (run / "summary.json").is_file():
            sys.exit(f"error: --ours {run}: no summary.json (not a finished training run)")
        summary = json.loads((run / "summary.json").read_text())
        return run, summary.get("train_runtime_s"), summary.get("steps")
    cmd = lc.train_command(lc_args, cell)
    seconds = run_stage(f"{OURS}-train", cmd, Path(args.out) / ".done")
    run = Path(lc_args.out) / cell["name"]
    summary = json.loads((run / "summary.json").read_text())
    return run, round(seconds, 1), summary.get("steps")


def planned_draft_ids(lc_args, cell, ds, train_rows):
    """The draft vocabulary our trainer will count for the cell (its own function and settings), known before
    it trains, so that speculators can train at the same time."""
    import torch

    from benchmark import bench_learning_curve as lc
    from modules.target_weights import target_config
    from train import train_eagle_ttt

    settings = train_eagle_ttt.parse_args(lc.train_command(lc_args, cell)[2:])
    ids, _ = train_eagle_ttt.draft_vocab_ids(settings, torch.utils.data.Subset(ds, train_rows),
                                             target_config(settings.model).vocab_size)
    return torch.as_tensor(ids).long()


def in_background(fn, *a):
    """Run fn(*a) in a thread (its subprocess runs beside ours); returns join() -> its value (or its exit)."""
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn(*a)
        except SystemExit as e:  # a failed stage: re-raised in the caller by join()
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]
    return join


def our_draft_ids(run):
    from safetensors import safe_open

    from benchmark.bench_eagle import resolve_draft_dir

    import torch

    draft_dir = resolve_draft_dir(run)
    with safe_open(str(draft_dir / "model.safetensors"), framework="pt") as f:
        d2t = f.get_tensor("d2t")
    return torch.arange(d2t.numel()) + d2t


# ---- the peer ---------------------------------------------------------------------------------------

def target_folder(args) -> Path:
    """An HF folder of the target (speculators' --verifier-name-or-path): a hub/local folder as given, the
    embedded GGUF converted once under OUT."""
    if args.model and Path(args.model).is_dir():
        return Path(args.model)
    if args.model and not args.model.endswith(".gguf"):
        sys.exit("error: speculators needs the target as a local HF folder: pass --model FOLDER")
    folder = Path(args.out) / "target"
    if not (folder / "config.json").is_file():
        import convert_target
        rc = convert_target.main(["--output-dir", str(folder), *(["--model", args.model] if args.model else [])])
        if rc:
            sys.exit(f"error: converting the target to {folder} failed")
    return folder


def prepare_peer_data(args, ds, train_rows, eval_rows, draft_ids, target):
    """speculators' data under OUT/speculators/data: hidden states (training rows, then held-out rows: its
    train_data_ratio split keeps the first len(train_rows)), the datasets folder, d2t/t2d."""
    from benchmark.peers import speculators_format as sf
    from modules.data.features import base_model

    data = Path(args.out) / PEER / "data"
    norm_w = base_model(target).norm.weight.detach().float().cpu()
    lengths = sf.write_peer_hidden_states(ds, train_rows + eval_rows, norm_w, args.max_length, data / "hidden_states")
    d2t, t2d = sf.write_vocab(draft_ids, target.config.vocab_size, data)
    if not (data / "dataset" / "dataset_info.json").is_file():
        _peer_run(args, [str(REPO_ROOT / "benchmark" / "peers" / "speculators_dataset.py"), "--hidden-states",
                         str(data / "hidden_states"), "--output", str(data / "dataset")], "peer-dataset")
    return data, lengths, d2t, t2d


def _peer_run(args, argv, name):
    from modules.stages import run_stage

    py = Path(args.peer_python)
    if not py.is_file():
        sys.exit(f"error: {py} not found: run `make install-speculators` first (speculators' own virtualenv)")
    return run_stage(name, [str(py), *argv], Path(args.out) / ".done")


def peer_train_argv(args, data, lengths, n_train, our_steps, steps_per_epoch, aux_layers, d2t, t2d, target_dir):
    train_tokens = sum(lengths[:n_train])
    seq_len = args.peer_tokens_per_step or max(max(lengths), train_tokens // steps_per_epoch)
    n = n_train + (len(lengths) - n_train)
    ratio = (n_train + 0.5) / n  # int(n * ratio) == n_train: the held-out rows are its validation split
    draft_vocab = int(d2t.stem.split("-")[-1])
    return [
        "-m", "speculators.train", "--speculator-type", "eagle3", "--verifier-name-or-path", str(target_dir),
        "--data-path", str(data / "dataset"), "--hidden-states-path", str(data / "hidden_states"),
        "--d2t-path", str(d2t), "--t2d-path", str(t2d), "--draft-vocab-size", str(draft_vocab),
        "--target-layer-ids", *map(str, aux_layers), "--total-seq-len", str(seq_len),
        "--train-data-ratio", f"{ratio:.10f}", "--epochs", str(math.ceil(args.epochs)),
        "--max-steps", str(our_steps), "--seed", str(args.seed),
        "--save-path", str(Path(args.out) / PEER / "checkpoints"), "--log-dir", str(Path(args.out) / PEER / "logs"),
        "--no-resume-from-checkpoint",
        # CPU: no fused (Triton) loss, no flex attention, no worker processes
        "--loss-implementation", "eager", "--draft-attn-impl", "sdpa", "--num-workers", "0",
        *args.peer_args], seq_len


def last_checkpoint(folder: Path) -> Path:
    epochs = sorted((p for p in folder.glob("*") if p.is_dir() and p.name.isdigit() and (p / "config.json").is_file()),
                    key=lambda p: int(p.name))
    if not epochs:
        sys.exit(f"error: no speculators checkpoint in {folder}")
    return epochs[-1]


# ---- measuring both the same way -------------------------------------------------------------------

def evaluate_heldout(args, draft, ds, eval_rows, head):
    """Our trainer's evaluation of a draft on the held-out conversations: per-step accuracy (4 TTT steps), EAL,
    simulated tau."""
    import tempfile

    import torch

    from modules.training.setup import training_arguments
    from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments
    from train import train_eagle_ttt

    with tempfile.TemporaryDirectory() as tmp:
        settings = train_eagle_ttt.parse_args(["--arch", "eagle3", "--ttt-steps", "4", "--max-length",
                                               str(args.max_length), "--batch-size", "1", "--output-dir", tmp,
                                               "--seed", str(args.seed)])
        trainer = TTTTrainer(model=draft, args=training_arguments(settings, True, cls=TTTTrainingArguments),
                             train_dataset=None, eval_dataset=torch.utils.data.Subset(ds, eval_rows),
                             data_collator=TTTCollator(max_length=args.max_length), target_head=head)
        metrics = trainer.evaluate()
    return {k.removeprefix("eval_"): round(float(v), 4) for k, v in metrics.items()
            if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}


def measure_decoding(lc_args, runs, target, tokenizer):
    """Tau of each draft on the prompt set in our decoder (bench_learning_curve.measure_cell), one plain pass."""
    from benchmark import bench_learning_curve as lc

    turns = lc.prompt_turns(target, tokenizer, lc_args)
    out = {}
    for name, run in runs.items():
        a = copy.copy(lc_args)
        a.out = str(Path(run).parent)
        t = time.time()
        out[name] = lc.measure_cell(a, {"name": Path(run).name, "folder": None}, target, turns,
                                    tokenizer.eos_token_id)
        print(f"{name}: {lc_args.prompts} tau {out[name][lc.tau_key(lc_args.prompts)]:.3f}, "
              f"{out[name]['matched_plain']}/{out[name]['turns']} outputs = plain greedy ({time.time() - t:.0f} s)",
              flush=True)
    return out


def print_table(rows, tau):
    cols = [("trainer", "{}"), ("steps", "{}"), ("train s", "{:.0f}"), ("tokens/s", "{:.0f}"),
            ("trainable", "{:,}"), ("eval top1", "{:.3f}"), ("step1", "{:.3f}"), ("step2", "{:.3f}"),
            ("step3", "{:.3f}"), ("EAL", "{:.3f}"), ("sim tau", "{:.3f}"), (tau, "{:.3f}"), ("= plain", "{}")]
    keys = ["trainer", "steps", "train_wall_s", "train_tokens_per_s", "trainable_params", "step0_acc", "step1_acc",
            "step2_acc", "step3_acc", "eal", "tau_sim", tau, "matched"]
    print("\n" + " ".join(f"{c:<11}" if c == "trainer" else f"{c:>11}" for c, _ in cols))
    for r in rows:
        cells = []
        for (_, fmt), k in zip(cols, keys):
            v = r.get(k)
            text = "-" if v is None else fmt.format(v)
            cells.append(f"{text:<11}" if k == "trainer" else f"{text:>11}")
        print(" ".join(cells))


def main(argv=None):
    import torch

    from benchmark import bench_learning_curve as lc
    from benchmark.bench_eagle import resolve_draft_dir
    from benchmark.peers import speculators_format as sf
    from modules.data.storage import atomic_write_text
    from modules.draft.eagle3_draft import Eagle3Draft
    from modules.target import load_target, model_display_name
    from modules.target_weights import load_embed_and_head

    args = parse_args(argv)
    lc_args, cell = lc_settings(args)
    ds, train_rows, eval_rows = splits(args, cell)
    steps_per_epoch = -(-args.conversations // args.grad_accum)
    print(f"{len(train_rows)} training / {len(eval_rows)} held-out conversations of {args.data} "
          f"(bench_learning_curve's split, seed {args.seed})")

    # 1. the draft vocabulary (ours: counted by our trainer's function, or read from --ours) and the peer's data
    draft_ids = our_draft_ids(args.ours) if args.ours else planned_draft_ids(lc_args, cell, ds, train_rows)
    target, tokenizer = load_target(args.model, dtype="fp32")
    first = ds[train_rows[0]]
    check = sf.check_pre_norm(target, first["input_ids"][:args.max_length].unsqueeze(0))
    print(f"pre-norm state (post / norm weight) on conversation {int(first['row_id'])} ({check['tokens']} tokens) "
          f"vs a real forward: normed state rel. error {check['trick_normed_rel']:.1e}, logits max abs "
          f"{check['trick_logits_max_abs']:.1e}, top-1 agree {check['trick_top1_agree']:.3f};\n  the wrong "
          f"convention (post given as pre): rel. error {check['wrong_normed_rel']:.2f}, top-1 agree "
          f"{check['wrong_top1_agree']:.3f}")
    target_dir = target_folder(args)
    data, lengths, d2t, t2d = prepare_peer_data(args, ds, train_rows, eval_rows, draft_ids, target)
    aux_layers = list(ds.aux_layers)
    planned_steps = math.ceil(steps_per_epoch * args.epochs)
    if args.ours:
        planned_steps = json.loads((Path(args.ours) / "summary.json").read_text()).get("steps") or planned_steps
    peer_argv, seq_len = peer_train_argv(args, data, lengths, len(train_rows), planned_steps, steps_per_epoch,
                                         aux_layers, d2t, t2d, target_dir)

    # 2. both trainers (one after the other, or with --concurrent side by side)
    if args.only:
        seconds = _peer_run(args, peer_argv, f"{PEER}-train") if args.only == PEER else run_ours(args, lc_args, cell)[1]
        print(f"{args.only}: trained in {seconds:.0f} s (rerun without --only to train the other and measure both)")
        return 0
    peer_join = in_background(_peer_run, args, peer_argv, f"{PEER}-train") if args.concurrent else None
    our_run, our_wall, our_steps = run_ours(args, lc_args, cell)
    peer_wall = peer_join() if peer_join else _peer_run(args, peer_argv, f"{PEER}-train")
    if not torch.equal(our_draft_ids(our_run), draft_ids):
        sys.exit(f"error: {our_run}: its draft vocabulary is not the one handed to speculators")
    ckpt = last_checkpoint(Path(args.out) / PEER / "checkpoints")
    peer_draft = sf.load_speculators_eagle3(ckpt, target=args.model)
    peer_run = Path(args.out) / PEER
    peer_draft.save_pretrained(peer_run / "draft")  # our layout: what our decoder's loader reads
    peer_steps = _peer_steps(ckpt)

    # 3. both measured the same way
    _, head = load_embed_and_head(args.model)
    rows = []
    runs = {OURS: our_run, PEER: peer_run}
    decoding = measure_decoding(lc_args, runs, target, tokenizer)
    train_tokens = round(cell["tokens_per_epoch"] * args.epochs)
    for name, run, wall, steps in ((OURS, our_run, our_wall, our_steps), (PEER, peer_run, peer_wall, peer_steps)):
        draft = Eagle3Draft.from_pretrained(resolve_draft_dir(run), target=args.model)
        trainable = _trainable(name, draft)
        ev = evaluate_heldout(args, draft, ds, eval_rows, head)
        tau = lc.tau_key(args.prompts)
        rows.append({"trainer": name, "steps": steps, "train_wall_s": wall,
                     "train_tokens_per_s": train_tokens / wall if wall else None, "trainable_params": trainable,
                     **ev, tau: decoding[name][tau], "matched": f"{decoding[name]['matched_plain']}/"
                                                                f"{decoding[name]['turns']}",
                     "decoding": decoding[name]})
    print_table(rows, lc.tau_key(args.prompts))

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "result", "data", "model", "peer_python")}
    settings |= {"data": Path(args.data).name, "model": Path(model_display_name(args.model)).name,
                 "draft_vocab_size": int(draft_ids.numel()), "aux_layers": aux_layers,
                 "peer_total_seq_len": seq_len, "planned_steps": planned_steps,
                 "train_tokens_per_epoch": cell["tokens_per_epoch"],
                 "peer_command": ["python", *[_no_paths(a, args) for a in peer_argv]]}
    result = {"settings": settings, "pre_norm_check": check, "rows": rows,
              "peer_checkpoint": ckpt.name, "held_out_rows": [int(ds.row_ids[i]) for i in eval_rows]}
    out = Path(args.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def _no_paths(a: str, args) -> str:
    """A command argument with this machine's folders replaced by names (results carry no machine paths)."""
    pairs = [(str(Path(args.out)), "OUT"), (str(REPO_ROOT), ".")]
    if args.model and Path(args.model).exists():
        pairs.insert(0, (str(Path(args.model)), "MODEL"))
    for folder, name in pairs:
        a = a.replace(folder, name)
    return a


def _peer_steps(ckpt: Path):
    state = ckpt / "training_state.json"
    if state.is_file():
        s = json.loads(state.read_text())
        return s.get("global_step", s.get("step"))
    return None


def _trainable(name, draft) -> int:
    """Trainable parameters as each trainer trains them: ours all but the embedding; speculators' frozen
    lm_head and embedding excluded."""
    skip = ("embed_tokens.",) + (("lm_head.",) if name == PEER else ())
    return sum(p.numel() for k, p in draft.named_parameters() if not k.startswith(skip))


if __name__ == "__main__":
    sys.exit(main())
