"""Repeated interleaved rounds: the order methods run in, and what is reported across the rounds. Shared by
benchmark/bench_eagle.py (our decoder) and benchmark/bench_vllm.py (the vLLM engine).

A speed figure on a shared CPU swings by up to a quarter between runs, and a method measured while another process
ran looks slow. So a benchmark runs R rounds. Each round runs every method once, in an order rotated by one place
per round (`round_order`: no method always goes first, or always right after the same neighbour). Per method:

- tokens/s: the median over the rounds, and their range (min..max): with 3 rounds the range is every measurement;
- speedup over plain: computed WITHIN each round (the method's tokens/s over the same round's plain), then the
  median and the range of those per-round ratios. A slow round slows both, so the ratio keeps what the pair shares;
- suspicious: the median speedup exceeds the method's tau (tokens per target forward: bench_eagle.py's tokens per
  draft-verify cycle, bench_vllm.py's tokens over forwards, steps without a draft included) by more than the
  speedup's range. A cycle costs at least one target forward, i.e. at least a plain
  step, so a method cannot beat plain by more than its tau; beyond it by more than its own spread is noise (e.g.
  plain measured while another process ran), not speed.

Acceptance counters are deterministic in greedy decoding: each method keeps the first round's, and `rounds_agree`
says whether every other round gave the same (a difference means nondeterminism worth a look).
"""
import statistics
from dataclasses import dataclass

from modules.settings import setting


# ---- SETTINGS (shared: bench_eagle.py, bench_vllm.py and demo.py take it with like()) ----------
@dataclass
class RoundsSettings:
    rounds: int = setting(3, "interleaved rounds: each runs every method once, the order rotated per round; "
                             "reported: the median tokens/s and speedup over the rounds, with their range "
                             "(benchmark/rounds.py)")
# -------------------------------------------------------------------------------------------------


def round_order(methods, round_index):
    """The methods in the order round `round_index` (0-based) runs them: rotated by one place per round, so over
    len(methods) rounds every method goes first once."""
    methods = list(methods)
    k = round_index % len(methods) if methods else 0
    return methods[k:] + methods[:k]


def value_range(values):
    """[min, max] of the values (the spread reported beside a median)."""
    return [min(values), max(values)]


def is_suspicious(speedups, tau):
    """True when the median speedup exceeds tau (tokens per cycle) by more than the speedups' range; None when
    the method has no tau (plain, HF prompt lookup)."""
    if tau is None or not speedups:
        return None
    low, high = value_range(speedups)
    return statistics.median(speedups) - tau > high - low


def combine(rounds_by_method, *, timing, tau_key, speedup_key="speedup", plain="plain", reused=()):
    """One summary per method from its per-round summaries.

    rounds_by_method: {method: [one dict per round, in round order]}, each dict the script's summary of that
    method in that round; `timing`: the keys that are measurements of time (they vary between rounds); every
    other key is a count that greedy decoding repeats exactly. `reused`: methods whose rounds come from an
    earlier run (bench_vllm.py --baselines): not interleaved with this run's, so a speedup that pairs one of
    them with one of this run's methods is taken against the other's median instead of round by round.

    -> {method: the first round's counts, and
        rounds_agree: every round gave the same counts;
        tokens_per_s: median over rounds, tokens_per_s_range: [min, max];
        speedup_key: median of the per-round speedups over plain, speedup_range: [min, max], speedup_paired:
            whether each round's speedup used the same round's plain (False: against plain's median);
        every other timing key: its median;
        suspicious: see is_suspicious;
        rounds: the per-round timing figures (the speedup per round included)}"""
    plain_rounds = rounds_by_method.get(plain)
    plain_tps = [r["tokens_per_s"] for r in plain_rounds] if plain_rounds else None
    out = {}
    for method, rounds in rounds_by_method.items():
        first = rounds[0]
        counts = {k: v for k, v in first.items() if k not in timing}
        summary = dict(counts)
        summary["rounds_agree"] = all({k: v for k, v in r.items() if k not in timing} == counts for r in rounds[1:])
        tps = [r["tokens_per_s"] for r in rounds]
        summary["tokens_per_s"] = statistics.median(tps)
        summary["tokens_per_s_range"] = value_range(tps)
        for key in timing:
            values = [r[key] for r in rounds if r.get(key) is not None]
            if key not in ("tokens_per_s", speedup_key) and values:
                summary[key] = statistics.median(values)
        per_round = [{k: r[k] for k in timing if k in r and k != speedup_key} for r in rounds]
        if plain_tps:
            paired = (method in reused) == (plain in reused) and len(tps) == len(plain_tps)
            base = plain_tps if paired else [statistics.median(plain_tps)] * len(tps)
            speedups = [round(t / p, 4) for t, p in zip(tps, base)]
            for figures, s in zip(per_round, speedups):
                figures[speedup_key] = s
            summary[speedup_key] = round(statistics.median(speedups), 4)
            summary["speedup_range"] = value_range(speedups)
            summary["speedup_paired"] = paired
            summary["suspicious"] = is_suspicious(speedups, first.get(tau_key))
        summary["rounds"] = per_round
        out[method] = summary
    return out


def rounds_note(summary, rounds):
    """The line a table ends with: how its figures were made, whether the counts agreed, what a flag means."""
    differ = [m for m, s in summary.items() if not s.get("rounds_agree", True)]
    flagged = [m for m, s in summary.items() if s.get("suspicious")]
    note = (f"tokens/s and speedup: median of {rounds} interleaved round(s) (order rotated each round), "
            f"[min..max] over the rounds; speedup taken within each round. ")
    note += (f"Counts (tau, acceptance, outputs) DIFFER between rounds for: {', '.join(differ)}."
             if differ else "Counts (tau, acceptance, outputs): the same in every round.")
    if flagged:
        note += (f"\n(!) {', '.join(flagged)}: the median speedup exceeds tau (tokens per cycle) by more than its "
                 f"spread: physically suspicious, a sign of noise (e.g. plain measured while another process ran).")
    return note
