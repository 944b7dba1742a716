"""Benchmark EAGLE-2 tree decoding against plain greedy decoding and HF prompt lookup on MT-bench.

    python benchmark/bench_eagle.py                      # embedded SmolLM2 + outputs/eagle2
    python benchmark/bench_eagle.py --num-questions 3 --max-new-tokens 64
    python benchmark/bench_eagle.py --sweep              # which tree shape is fastest here
    python benchmark/bench_eagle.py --prompts humaneval --hybrid-lookup 8   # code prompts, + hybrid trees
    python benchmark/bench_eagle.py --depth 3 --hybrid-rule 2               # + chain of 3, alone and with the rule

Both turns of every question are run (the second after the model's own first answer). Per
question and turn the methods run one after another (interleaved, so machine noise hits them
alike), after a warm-up, and the whole pass is repeated --rounds times with the order rotated per
round (benchmark/rounds.py). Reports the median tokens/s over the rounds with its range, the speedup
over plain decoding taken within each round (median, range), tau (tokens per draft-verify cycle,
bonus included), the acceptance histogram, the decoder's own overhead (time outside target and draft
forwards), whether every greedy output matched plain decoding and whether every round counted the
same; a speedup above tau by more than its range is flagged (noise). Writes --out (JSON, with every
run and every round's figures) and a PNG next to it.
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmark.rounds import RoundsSettings, rounds_note
from modules.settings import like, parse_settings, setting

# the tree shapes --sweep tries: (total, depth, top_k)
SWEEP_SHAPES = [(4, 3, 1), (6, 3, 2), (8, 4, 2), (10, 4, 3), (12, 4, 4), (16, 5, 4), (24, 6, 4)]


# ---- SETTINGS ----------------------------------------------------------------------------
# Edit a default here or pass the flag (--num-questions 3); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    draft: str | None = setting(None, "draft folder (None: outputs/eagle2)")
    model: str | None = setting(None, "target model id/path (None: embedded SmolLM2-135M-Instruct)")
    prompts: str = setting("mt-bench", "prompt set: mt-bench, humaneval (benchmark/prompt_sets.py) or a JSONL file, "
                                       "one object a line with 'turns'", aliases=["--question-file"])
    num_questions: int = setting(10, "questions (each with all its turns)")
    max_new_tokens: int = setting(128, "tokens generated per turn")
    total_tokens: int = setting(12, "tree size per verify (root included); small trees suit a 2-core CPU")
    depth: int = setting(4, "tree depth")
    top_k: int = setting(4, "children per tree node")
    temperature: float = setting(0.0, "sampling temperature (0: greedy, outputs compared with plain greedy)")
    prompt_lookup_tokens: int = setting(10, "HF prompt lookup: tokens per proposal")
    hybrid_lookup: int = setting(0, "also run EAGLE with a prompt-lookup branch of up to N tokens grafted onto every "
                                    "tree (modules/decode/lookup.py; greedy only); 0 = off")
    hybrid_rule: int = setting(0, "also run a chain of --depth draft tokens, alone and with the hybrid rule: a "
                                  "prompt-lookup match of >= N tokens replaces the chain (modules/decode/hybrid.py, "
                                  "what the vLLM plugin serves; greedy only); 0 = off")
    draft_vocab: int = setting(16384, "draft scores only the N most frequent tokens (cheaper head, output "
                                      "unchanged; 0 = all)")
    draft_vocab_data: str | None = setting(None, "generated-data folder to count token frequencies (None: "
                                                 "data_out/eagle2; without it the N lowest ids, BPE's most common "
                                                 "merges, are used)")
    dtype: str = setting("fp32", "the target's dtype (all methods use the same target)")
    draft_dtype: str = setting("auto", "draft dtype (auto: bf16 on GPUs and on CPUs with bf16 units, else fp32; "
                                       "fp32, bf16, fp16); never changes the output, only its speed")
    device: str = setting("auto", "auto: this process's GPU (cuda:LOCAL_RANK under torchrun) or cpu "
                                  "(modules/placement.py)")
    spread_target: bool = setting(False, "spread the target over every visible GPU (device_map=auto); the draft "
                                         "sits on its LM head's GPU")
    threads: int | None = setting(None, "torch threads on CPU (None: torch's default)")
    turns: int = setting(2, "turns per question (MT-bench has 2)")
    rounds: int = like(RoundsSettings, "rounds")
    sweep: bool = setting(False, "try tree shapes (first turns only), report the fastest", action="store_true")
    out: str = setting("benchmark/results/eagle.json", "result file (JSON; a PNG is written beside it)")
    seed: int = setting(0, "sampling seed")
# -------------------------------------------------------------------------------------------


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.split("\n")[0])


def resolve_draft_dir(path):
    """A draft folder: `path` itself, its `draft/` export (what train/train.py writes at the end),
    or its newest `checkpoint-N/`; None when there is none."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "draft" / "config.json").is_file():
        return path / "draft"
    ckpts = sorted((p for p in path.glob("checkpoint-*") if (p / "config.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return ckpts[-1] if ckpts else None


def draft_vocab_ids(n, data_dir, vocab_size, eos):
    """(token ids the draft may propose or None for all, where they came from)."""
    if not n or n >= vocab_size:
        return None, "full vocabulary"
    import torch

    from modules.draft.vocab import count_tokens, shard_token_pairs

    special = [eos] if eos is not None else []
    try:
        counts = count_tokens(shard_token_pairs(data_dir), vocab_size)
        order = torch.argsort(counts, descending=True, stable=True)
        source = f"{n} most frequent trained tokens of {data_dir}"
    except (FileNotFoundError, ValueError):
        order = torch.arange(vocab_size)
        source = f"{n} lowest token ids (no token counts in {data_dir})"
    ids = torch.cat([torch.tensor(special, dtype=torch.long), order[:n]]).unique()
    return ids, source


def print_table(summary, rounds):
    """The summary as a table: median tokens/s and speedup with their [min..max] over the rounds; '!' flags a
    speedup above tau by more than its range (benchmark/rounds.py)."""
    print(f"{'method':<30}{'tok/s':>7}{'[range]':>13}{'speedup':>9}{'[range]':>13}{'tau':>6}{'ms/cyc':>8}"
          f"{'draft':>7}{'verify':>8}{'ovh%':>6}{'lookup%':>8}{'match':>8}")
    for m, s in summary.items():
        f = lambda k, fmt: (fmt.format(s[k]) if s.get(k) is not None else "-")  # noqa: E731
        span = lambda k, fmt: ("[" + "..".join(fmt.format(v) for v in s[k]) + "]" if s.get(k) else "")  # noqa: E731
        print(f"{m:<30}{f('tokens_per_s', '{:.1f}'):>7}{span('tokens_per_s_range', '{:.1f}'):>13}"
              f"{f('speedup', '{:.2f}x'):>9}{span('speedup_range', '{:.2f}'):>13}{f('tau', '{:.2f}'):>6}"
              f"{f('ms_per_cycle', '{:.1f}'):>8}{f('draft_ms_per_cycle', '{:.1f}'):>7}"
              f"{f('target_ms_per_cycle', '{:.1f}'):>8}{f('overhead_pct', '{:.1f}'):>6}"
              f"{f('lookup_cycle_share', '{:.0%}'):>8}"
              + (f"{s['matched_plain']:>4}/{s['runs']:<3}" if s["matched_plain"] is not None else f"{'-':>8}")
              + (" !" if s.get("suspicious") else ""))
    print(rounds_note(summary, rounds))


def plot(summary, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.training.curves import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary)
    medians = [summary[m]["tokens_per_s"] or 0 for m in names]
    ranges = [summary[m].get("tokens_per_s_range") or [v, v] for m, v in zip(names, medians)]
    axes[0].bar(names, medians, color="tab:blue",
                yerr=[[v - lo for v, (lo, _) in zip(medians, ranges)], [hi - v for v, (_, hi) in zip(medians, ranges)]],
                capsize=4, ecolor="black")
    for i, m in enumerate(names):
        s = summary[m]
        if s.get("speedup"):
            low, high = s.get("speedup_range") or (s["speedup"], s["speedup"])
            axes[0].text(i, ranges[i][1], f"{s['speedup']:.2f}x\n[{low:.2f}..{high:.2f}]"
                         + ("\n(!) > tau" if s.get("suspicious") else ""), ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("tokens / s")
    rounds = len(next(iter(summary.values())).get("rounds", [None]))
    axes[0].set_title(f"throughput: median of {rounds} round(s), bars min..max")
    axes[0].set_ylim(0, max(hi for _, hi in ranges) * 1.3)
    axes[0].tick_params(axis="x", labelrotation=20)
    for m in names:
        hist = summary[m].get("accept_length_histogram")
        if hist:
            total = sum(hist)
            axes[1].plot(range(1, len(hist) + 1), [h / total for h in hist], marker="o",
                         label=f"{m} (tau {summary[m]['tau']:.2f})")
    axes[1].set_xlabel("tokens per cycle (accepted + bonus)")
    axes[1].set_ylabel("fraction of cycles")
    axes[1].set_title("acceptance length")
    if axes[1].lines:
        axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


# ---- the steps of main ----------------------------------------------------------------------

def load_questions_and_draft_dir(args):
    """(draft folder, questions); exits with a clear error when either is missing or malformed."""
    from benchmark.mt_bench import QuestionFileError
    from benchmark.prompt_sets import load_prompt_set
    from modules import paths

    asked = Path(args.draft) if args.draft else paths.DEFAULT_TRAIN_DIR
    draft_dir = resolve_draft_dir(asked)
    if draft_dir is None:
        sys.exit(f"error: no draft at {asked} (no config.json there, in draft/ or in checkpoint-*/): "
                 f"train one with `python train/train.py` or pass --draft DIR")
    print(f"draft: {draft_dir}")
    try:
        questions, skipped = load_prompt_set(args.prompts, args.num_questions)
    except QuestionFileError as e:
        sys.exit(f"error: {e}")
    if skipped:
        print(f"skipped question rows: {skipped}")
    return draft_dir, questions


def load_models(args, draft_dir):
    """(target, tokenizer, draft); the draft sits on the target's output device (modules/placement.py)."""
    from modules.draft.loading import load_draft
    from modules.placement import output_device
    from modules.target import TargetLoadError, load_target, pick_dtype

    print("loading target and draft ...", flush=True)
    try:
        target, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device, spread=args.spread_target)
    except TargetLoadError as e:
        sys.exit(f"error: {e}")
    device = output_device(target)
    try:
        draft_dtype = pick_dtype(args.draft_dtype, device)
        draft = load_draft(draft_dir, target_model=target, dtype=draft_dtype).to(device).eval()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: cannot load draft {draft_dir}: {str(e).splitlines()[0]}")
    return target, tokenizer, draft


def build_adapter(args, draft, eos):
    """(the decoder's adapter for the draft, where the tokens it proposes come from)."""
    from modules import paths
    from modules.draft.kinds import kind_of

    kind, vocab_ids, vocab_source = kind_of(draft), None, "the draft's own"
    if not kind.own_vocab:  # EAGLE-1/2: a full-vocabulary head, restricted here (modules/draft/kinds.py)
        vocab_ids, vocab_source = draft_vocab_ids(args.draft_vocab, args.draft_vocab_data or paths.DEFAULT_DATA_DIR,
                                                  draft.lm_head.weight.shape[0], eos)
        print(f"draft proposes from: {vocab_source}")
    return kind.tree_adapter(draft, vocab_ids), vocab_source


def build_methods(args, target, adapter):
    """([(name, run function, its keyword arguments)], tree shapes, turns per question)."""
    from benchmark.methods import run_eagle, run_lookup, run_plain
    from modules.decode.parallel import make_decoder

    def decoder_for(total, depth, k, lookup=0, rule=0):  # a parallel draft (P-EAGLE, DFlash) proposes its block
        try:
            return make_decoder(target, adapter, total_tokens=total, depth=depth, top_k=k, lookup_tokens=lookup,
                                hybrid_min_match=rule, temperature=args.temperature,
                                timing=True)  # the report splits draft / target time
        except ValueError as e:
            sys.exit(f"error: {e}")

    if args.sweep:
        shapes = SWEEP_SHAPES
        methods = [("plain", run_plain, {})] + [
            (f"eagle t{t}-d{d}-k{k}", run_eagle, {"decoder": decoder_for(t, d, k)}) for t, d, k in shapes]
        return methods, shapes, 1
    shapes = [(args.total_tokens, args.depth, args.top_k)]
    methods = [("plain", run_plain, {}),
               (f"prompt lookup {args.prompt_lookup_tokens}", run_lookup,
                {"lookup_tokens": args.prompt_lookup_tokens}),
               ("eagle", run_eagle, {"decoder": decoder_for(*shapes[0])})]
    if args.hybrid_lookup > 0:
        methods.append((f"eagle + lookup {args.hybrid_lookup}", run_eagle,
                        {"decoder": decoder_for(*shapes[0], lookup=args.hybrid_lookup)}))
    if args.hybrid_rule > 0:  # the chain vLLM serves (--depth tokens), alone and with the rule
        chain = (args.depth + 1, args.depth, 1)
        methods += [(f"chain {args.depth}", run_eagle, {"decoder": decoder_for(*chain)}),
                    (f"chain {args.depth} + lookup rule {args.hybrid_rule}", run_eagle,
                     {"decoder": decoder_for(*chain, rule=args.hybrid_rule)})]
    return methods, shapes, args.turns


def first_mismatch(tokens, reference):
    """Index of the first differing token (the shorter length when one is a prefix of the other)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def run_turn(args, target, ids, methods, eos, generator, question_id, turn, round_number):
    """Every method, one after another in the order given, on one prompt: (run records in that order, plain
    decoding's tokens), each output compared with plain's once all have run (plain need not go first)."""
    greedy = args.temperature <= 0
    runs = [(name, *fn(target, ids, args.max_new_tokens, eos, generator=generator, temperature=args.temperature,
                       **kw)) for name, fn, kw in methods]
    plain_tokens = next(tokens for name, tokens, _, _ in runs if name == "plain")
    records = []
    for name, tokens, sec, extra in runs:
        rec = {"method": name, "round": round_number, "question_id": question_id, "turn": turn + 1,
               "prompt_tokens": len(ids), "new_tokens": len(tokens), "seconds": round(sec, 5),
               "matches_plain": tokens == plain_tokens if greedy else None, **extra}
        if greedy and tokens != plain_tokens:
            rec["first_mismatch"] = first_mismatch(tokens, plain_tokens)
        records.append(rec)
    return records, plain_tokens


def run_benchmark(args, target, tokenizer, methods, questions, turns, generator):
    """Warm every method up, then run them on every question and turn, --rounds times (the order rotated per
    round, benchmark/rounds.py); the run records."""
    from tqdm import tqdm

    from benchmark.mt_bench import conversation, prompt_ids
    from benchmark.rounds import round_order

    eos = tokenizer.eos_token_id
    # Warm-up: every method once on a short prompt (allocator, kernels, lazy inits).
    warm = prompt_ids(tokenizer, conversation(["Say hello."], []))
    for name, fn, kw in methods:
        fn(target, warm, 8, eos, generator=generator, temperature=args.temperature, **kw)

    records = []
    bar = tqdm(total=args.rounds * sum(min(turns, len(q["turns"])) for q in questions),
               desc="rounds x questions x turns")
    for r in range(args.rounds):
        order = round_order(methods, r)
        for q in questions:
            answers = []
            for turn in range(min(turns, len(q["turns"]))):
                ids = prompt_ids(tokenizer, conversation(q["turns"][:turn + 1], answers))
                turn_records, plain_tokens = run_turn(args, target, ids, order, eos, generator, q["question_id"],
                                                      turn, r + 1)
                records += turn_records
                # The next turn follows the model's own answer (plain greedy decoding's).
                answers.append(tokenizer.decode(plain_tokens, skip_special_tokens=True).strip())
                bar.update(1)
    bar.close()
    return records


def report(args, summary, records, settings):
    """Print the table (and the fastest shape of a sweep); the result to save."""
    print_table(summary, args.rounds)
    if args.temperature > 0:
        print("(temperature > 0: every method samples, so the counts differ between rounds by design; outputs are "
              "not compared, the decoder's exactness in distribution is a test: tests/test_decode_lossless.py)")
    result = {"settings": settings, "note": rounds_note(summary, args.rounds), "summary": summary, "runs": records}
    if args.sweep:
        eagle = {m: s for m, s in summary.items() if m.startswith("eagle")}
        best = max(eagle, key=lambda m: eagle[m]["tokens_per_s"])
        result["best_shape"] = best
        print(f"fastest tree shape here: {best} (median {eagle[best]['tokens_per_s']:.1f} tok/s, "
              f"{eagle[best]['speedup']:.2f}x, tau {eagle[best]['tau']:.2f})")
    return result


def save(result, out, title):
    """Write the result JSON (atomically) and its PNG next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    png = out.with_suffix(".png")
    plot(result["summary"], png, title)
    print(f"wrote {out} and {png}")


# ---- main: load -> build -> run -> save ---------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    import torch

    from benchmark.methods import summarize_rounds
    from modules import paths
    from modules.placement import output_device

    if args.threads:
        torch.set_num_threads(args.threads)
    draft_dir, questions = load_questions_and_draft_dir(args)
    target, tokenizer, draft = load_models(args, draft_dir)
    torch.manual_seed(args.seed)  # HF sampling draws from the global generator
    generator = torch.Generator(device=output_device(target)).manual_seed(args.seed)
    adapter, vocab_source = build_adapter(args, draft, tokenizer.eos_token_id)
    methods, shapes, turns = build_methods(args, target, adapter)

    records = run_benchmark(args, target, tokenizer, methods, questions, turns, generator)

    summary = summarize_rounds(records, max(d for _, d, _ in shapes))
    settings = vars(args) | {
        "draft": str(draft_dir), "model": args.model or paths.EMBEDDED_MODEL_NAME,
        "dtype": str(target.dtype).replace("torch.", ""), "device": str(target.device),
        "threads": torch.get_num_threads(), "questions": len(questions), "draft_vocab_source": vocab_source,
        "draft_dtype": str(next(draft.parameters()).dtype).replace("torch.", ""),
        "shapes": [list(s) for s in shapes]}
    result = report(args, summary, records, settings)
    save(result, args.out, f"{settings['model']} on {settings['device']}, {len(questions)} questions x {turns} turns, "
                           f"{args.max_new_tokens} new tokens, {args.rounds} round(s)")
    return result


if __name__ == "__main__":
    main()
