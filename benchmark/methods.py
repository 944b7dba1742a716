"""What the decoding benchmarks measure, shared by benchmark/bench_eagle.py and benchmark/bench_eagle3.py:
the methods (plain greedy, HF prompt lookup, our EAGLE decoder), each taking prompt ids and returning
(new token ids, seconds, extra stats), the per-method summary of their records, and (bench_eagle.py) that summary
across interleaved rounds (benchmark/rounds.py)."""
import time


# ---- methods: each takes prompt ids, returns (new token ids, seconds, extra stats) ----------

def run_plain(target, ids, max_new, eos, temperature=0.0, **_):
    return _hf_generate(target, ids, max_new, eos, temperature)


def run_lookup(target, ids, max_new, eos, temperature=0.0, lookup_tokens=10, **_):
    return _hf_generate(target, ids, max_new, eos, temperature, prompt_lookup_num_tokens=lookup_tokens)


def _hf_generate(target, ids, max_new, eos, temperature, **kw):
    import torch

    x = torch.tensor([ids], device=target.device)
    # Same distribution as our sampler: plain temperature, no top-k / top-p filtering.
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False,
                                                                                         temperature=None)
    t = time.perf_counter()
    out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, eos_token_id=eos,
                          pad_token_id=eos, top_p=None, top_k=None, repetition_penalty=None, **sampling, **kw)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(ids):].tolist(), time.perf_counter() - t, {}


def run_eagle(target, ids, max_new, eos, decoder=None, generator=None, **_):
    t = time.perf_counter()
    res = decoder.generate(ids, max_new, eos_token_id=eos, generator=generator)
    sec = time.perf_counter() - t
    return res.tokens, sec, {"accept_lengths": res.accept_lengths, "from_lookup": res.from_lookup,
                             "draft_s": res.draft_s, "target_s": res.target_s, "cycles_s": res.cycles_s,
                             "prefill_s": res.prefill_s}


# ---- summary -------------------------------------------------------------------------------

# the figures of `summarize` that are measurements of time (they vary between rounds); the others are counts
TIMING_KEYS = ("seconds", "tokens_per_s", "speedup", "speedup_vs_prompt_lookup", "ms_per_cycle", "draft_ms_per_cycle",
               "target_ms_per_cycle", "overhead_pct")


def summarize(records, depth):
    """Per-method totals from the per-run records."""
    methods = []
    for r in records:
        if r["method"] not in methods:
            methods.append(r["method"])
    plain_tps = None
    summary = {}
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        tokens = sum(r["new_tokens"] for r in rs)
        seconds = sum(r["seconds"] for r in rs)
        s = {"runs": len(rs), "new_tokens": tokens, "seconds": round(seconds, 4),
             "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
             "matched_plain": (sum(bool(r["matches_plain"]) for r in rs)
                               if all(r.get("matches_plain") is not None for r in rs) else None)}
        acc = [a for r in rs for a in r.get("accept_lengths", [])]
        if acc:
            cyc = sum(r["cycles_s"] for r in rs)
            draft = sum(r["draft_s"] for r in rs)
            tgt = sum(r["target_s"] for r in rs)
            hist = [acc.count(i) for i in range(1, max(max(acc), depth + 1) + 1)]
            # Acceptance rate at depth d: P(accept >= d draft tokens | accepted >= d-1).
            reach = [sum(a - 1 >= d for a in acc) for d in range(0, depth + 1)]
            s.update({
                "tau": round(sum(acc) / len(acc), 4), "cycles": len(acc),
                "accept_length_histogram": hist,  # index i: cycles that produced i+1 tokens
                "acceptance_rate_by_depth": [round(reach[d] / reach[d - 1], 4) if reach[d - 1] else None
                                             for d in range(1, depth + 1)],
                "ms_per_cycle": round(1000 * cyc / len(acc), 3),
                "draft_ms_per_cycle": round(1000 * draft / len(acc), 3),
                "target_ms_per_cycle": round(1000 * tgt / len(acc), 3),
                "overhead_pct": round(100 * (cyc - draft - tgt) / cyc, 2) if cyc else None,
            })
            used = [u for r in rs for u in r.get("from_lookup", [])]
            if any(used):  # the hybrid rule (modules/decode/hybrid.py): cycles that verified the lookup's tokens
                s["lookup_cycle_share"] = round(sum(used) / len(used), 4)
                # tokens per cycle in the cycles the lookup's tokens were verified, and in the draft's own cycles
                # (docs/serving.md, "Projected on a GPU", combines them with a published tau)
                by_lookup = [a for a, u in zip(acc, used) if u]
                by_draft = [a for a, u in zip(acc, used) if not u]
                s["tau_lookup_cycles"] = round(sum(by_lookup) / len(by_lookup), 4)
                s["tau_draft_cycles"] = round(sum(by_draft) / len(by_draft), 4) if by_draft else None
        summary[m] = s
        if m == "plain":
            plain_tps = s["tokens_per_s"]
    lookup_tps = next((s["tokens_per_s"] for m, s in summary.items() if m.startswith("prompt lookup")), None)
    for m, s in summary.items():
        s["speedup"] = round(s["tokens_per_s"] / plain_tps, 3) if plain_tps and s["tokens_per_s"] else None
        if lookup_tps and s["tokens_per_s"]:
            s["speedup_vs_prompt_lookup"] = round(s["tokens_per_s"] / lookup_tps, 3)
    return summary


def summarize_rounds(records, depth):
    """Per method across the rounds of the records (their 'round' field; none: one round): each round summarized
    alone (summarize), then combined (benchmark/rounds.py: median tokens/s and its range, the speedup over the
    same round's plain, the first round's counts and whether every round repeated them, the suspicious flag)."""
    from benchmark.rounds import combine

    numbers = sorted({r.get("round", 1) for r in records})
    per_round = [summarize([r for r in records if r.get("round", 1) == n], depth) for n in numbers]
    return combine({m: [s[m] for s in per_round] for m in per_round[0]}, timing=TIMING_KEYS, tau_key="tau")
