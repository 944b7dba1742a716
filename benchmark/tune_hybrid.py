"""Pick the hybrid rule's min_match on a split of its own (sharegpt-tune), never on a set results are reported on.

    python benchmark/tune_hybrid.py --draft outputs/eagle3/draft                     # 40 tuning prompts x 96 tokens
    python benchmark/tune_hybrid.py --draft DRAFT --depth 4 --candidates 1 2 3 4 6 8 --num-questions 80

The hybrid rule (modules/decode/hybrid.py): in a cycle where the context's last n >= min_match tokens occurred
earlier, the tokens that followed replace the draft's. min_match is the rule's one setting, and a value picked on
the prompts a result is reported on would flatter that result. So this script runs our decoder, a chain of --depth
draft tokens as vLLM serves it (a parallel draft: its trained block), once with each candidate and once without
the rule (the draft alone, for reference), on the first turns of the tuning split (benchmark/prompt_sets.py,
sharegpt-tune: ShareGPT rows 16,000-16,999, disjoint from MT-bench, HumanEval, sharegpt-heldout and the training
rows; a reported set is refused). Greedy: every output is checked against plain greedy decoding. It picks the
candidate with the highest tau, tokens per target forward (a cycle costs one target forward whichever tokens it
verifies, so tau decides; it is deterministic and needs no timing); a tie goes to the larger min_match, the one
that replaces the draft less often. Writes --out (JSON) and a PNG beside it, and prints the flags that use the
choice: train/export.py --hybrid-lookup N, benchmark/bench_vllm.py --hybrid-min-match N,
benchmark/bench_eagle.py --hybrid-rule N.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmark.bench_eagle import Settings as EagleBench
from benchmark.bench_vllm import Settings as VllmBench
from benchmark.prompt_sets import REPORTED_SETS
from modules.settings import like, parse_settings, setting


# ---- SETTINGS ----------------------------------------------------------------------------
# Edit a default here or pass the flag (--num-questions 80); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    draft: str | None = like(EagleBench, "draft")
    model: str | None = like(EagleBench, "model")
    prompts: str = setting("sharegpt-tune", "the tuning split (benchmark/prompt_sets.py) or a .jsonl file of prompts "
                                            f"kept out of every report; refused: {', '.join(REPORTED_SETS)}")
    num_questions: int = setting(40, "prompts of the tuning split (first turns)")
    max_new_tokens: int = like(EagleBench, "max_new_tokens", 96)
    depth: int = like(VllmBench, "num_spec_tokens",
                      help="draft tokens per cycle, as served (bench_vllm.py --num-spec-tokens); a parallel draft "
                           "proposes its trained block")
    candidates: list[int] = setting([1, 2, 3, 4, 6, 8], "min_match values tried (1 to 8, modules/decode/hybrid.py)")
    draft_vocab: int = like(EagleBench, "draft_vocab")
    draft_vocab_data: str | None = like(EagleBench, "draft_vocab_data")
    dtype: str = like(EagleBench, "dtype")
    draft_dtype: str = like(EagleBench, "draft_dtype")
    device: str = like(EagleBench, "device")
    spread_target: bool = like(EagleBench, "spread_target")
    threads: int | None = like(EagleBench, "threads")
    out: str = setting("benchmark/results/hybrid_min_match.json", "result file (JSON; a PNG is written beside it)")
# -------------------------------------------------------------------------------------------

ALONE = "draft alone"


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.split("\n")[0])


def method_name(min_match):
    return f"min_match {min_match}" if min_match else ALONE


def choose(summary, candidates):
    """The candidate with the highest tau (a tie: the larger min_match); None when an output differs from plain."""
    if any(s["matched_plain"] != s["runs"] for s in summary.values()):
        return None
    return max(candidates, key=lambda n: (summary[method_name(n)]["tau"], n))


def run(args, target, tokenizer, adapter, questions):
    """Plain greedy decoding and the chain with each candidate (and alone) on every first turn: the run records."""
    from tqdm import tqdm

    from benchmark.methods import run_eagle, run_plain
    from benchmark.mt_bench import conversation, prompt_ids
    from modules.decode.parallel import make_decoder

    try:
        decoders = {method_name(n): make_decoder(target, adapter, total_tokens=args.depth + 1, depth=args.depth,
                                                 top_k=1, hybrid_min_match=n)
                    for n in [0, *args.candidates]}
    except ValueError as e:
        sys.exit(f"error: {e}")
    eos, records = tokenizer.eos_token_id, []
    for q in tqdm(questions, desc="tuning prompts"):
        ids = prompt_ids(tokenizer, conversation(q["turns"][:1], []))
        plain, _, _ = run_plain(target, ids, args.max_new_tokens, eos)
        for name, decoder in decoders.items():
            tokens, sec, extra = run_eagle(target, ids, args.max_new_tokens, eos, decoder=decoder)
            records.append({"method": name, "question_id": q["question_id"], "new_tokens": len(tokens),
                            "seconds": sec, "matches_plain": tokens == plain, **extra})
    return records


def plot(summary, candidates, chosen, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.training.curves import save_figure

    fig, ax = plt.subplots(figsize=(7, 3.6))
    taus = [summary[method_name(n)]["tau"] for n in candidates]
    ax.bar([str(n) for n in candidates], taus, color=["tab:orange" if n == chosen else "tab:blue" for n in candidates])
    for i, n in enumerate(candidates):
        share = summary[method_name(n)].get("lookup_cycle_share", 0)
        ax.text(i, taus[i], f"{taus[i]:.2f}\n{share:.0%} lookup", ha="center", va="bottom", fontsize=8)
    ax.axhline(summary[ALONE]["tau"], color="black", linestyle="--", label=f"{ALONE} (tau {summary[ALONE]['tau']:.2f})")
    ax.set_xlabel("min_match" + (f" (chosen: {chosen})" if chosen else ""))
    ax.set_ylabel("tau (tokens per target forward)")
    ax.set_ylim(0, max(taus + [summary[ALONE]["tau"]]) * 1.25)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.prompts in REPORTED_SETS:
        sys.exit(f"error: --prompts {args.prompts} is a set results are reported on; tune on sharegpt-tune "
                 f"(benchmark/prompt_sets.py)")
    import torch

    from benchmark.bench_eagle import build_adapter, load_models, load_questions_and_draft_dir
    from benchmark.methods import summarize

    if args.threads:
        torch.set_num_threads(args.threads)
    draft_dir, questions = load_questions_and_draft_dir(args)
    target, tokenizer, draft = load_models(args, draft_dir)
    adapter, _ = build_adapter(args, draft, tokenizer.eos_token_id)
    summary = summarize(run(args, target, tokenizer, adapter, questions), args.depth)
    chosen = choose(summary, args.candidates)

    print(f"{'':<14}{'tau':>7}{'lookup cycles':>15}{'tau there':>11}{'tau elsewhere':>15}{'= plain':>9}")
    for name, s in summary.items():
        f = lambda k, fmt: fmt.format(s[k]) if s.get(k) is not None else "-"  # noqa: E731
        print(f"{name:<14}{s['tau']:>7.3f}{f('lookup_cycle_share', '{:.1%}'):>15}{f('tau_lookup_cycles', '{:.2f}'):>11}"
              f"{f('tau_draft_cycles', '{:.2f}'):>15}{s['matched_plain']:>5}/{s['runs']}")
    if chosen is None:
        print("an output differs from plain greedy decoding: no choice made (a decoder bug, not a tuning result)")
    else:
        gain = summary[method_name(chosen)]["tau"] / summary[ALONE]["tau"]
        print(f"chosen on {args.prompts} ({len(questions)} prompts): min_match {chosen}, tau {gain:.3f}x the draft "
              f"alone's" + ("" if gain > 1 else " (the rule does not pay with this draft here: serve it alone)"))
        print(f"use it: train/export.py --hybrid-lookup {chosen}; benchmark/bench_vllm.py --hybrid-min-match {chosen}; "
              f"benchmark/bench_eagle.py --hybrid-rule {chosen}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from modules.io import atomic_write_text
    result = {"settings": vars(args) | {"draft": str(draft_dir), "questions": len(questions)},
              "chosen_min_match": chosen, "summary": summary}
    atomic_write_text(out, json.dumps(result, indent=1))
    plot(summary, args.candidates, chosen, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
