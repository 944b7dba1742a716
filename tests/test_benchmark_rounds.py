"""benchmark/rounds.py: the order rotated per round, medians and ranges, speedups paired within a round, the flag
on a speedup above tau by more than its spread, and whether rounds agreed, on made-up per-round figures."""
import pytest

from benchmark.rounds import combine, is_suspicious, round_order, rounds_note

TIMING = ("seconds", "tokens_per_s", "speedup", "ms_per_cycle")


def per_round(tokens_per_s, tau=None, **counts):
    """A method's per-round summaries: the given tokens/s, fixed counts (as greedy decoding repeats them)."""
    return [{"tokens_per_s": t, "seconds": 100 / t, "ms_per_cycle": 1000 / t, "tau": tau, "runs": 12, **counts}
            for t in tokens_per_s]


def test_the_order_rotates_so_no_method_always_goes_first():
    methods = ["plain", "lookup", "eagle", "hybrid"]
    orders = [round_order(methods, r) for r in range(4)]
    assert orders[0] == methods and orders[1] == ["lookup", "eagle", "hybrid", "plain"]
    assert all(sorted(o) == sorted(methods) for o in orders)
    assert [o[0] for o in orders] == methods  # over 4 rounds each method goes first once
    for position in range(4):  # ... and takes every place once
        assert sorted(o[position] for o in orders) == sorted(methods)
    assert round_order(methods, 4) == methods and round_order([], 2) == []
    # the default 3 rounds: three different methods go first
    assert len({round_order(methods, r)[0] for r in range(3)}) == 3


def test_median_range_and_the_speedup_taken_within_each_round():
    # round 2 ran while something else did: plain and the draft both slowed by the same factor
    s = combine({"plain": per_round([20.0, 10.0, 21.0]), "eagle": per_round([24.0, 12.0, 25.2], tau=1.3)},
                timing=TIMING, tau_key="tau")
    e = s["eagle"]
    assert e["tokens_per_s"] == 24.0 and e["tokens_per_s_range"] == [12.0, 25.2]
    assert [r["speedup"] for r in e["rounds"]] == [1.2, 1.2, 1.2]
    assert e["speedup"] == 1.2 and e["speedup_range"] == [1.2, 1.2] and e["speedup_paired"]
    assert e["ms_per_cycle"] == pytest.approx(1000 / 24)  # other timing keys: their median
    assert s["plain"]["speedup"] == 1.0 and s["plain"]["suspicious"] is None  # no tau: no flag
    assert e["runs"] == 12 and e["rounds_agree"] is True
    # control: the same figures against plain's median instead of the same round's plain (what a reused
    # baseline gets) keep the slow round's dip: 0.6x in round 2
    u = combine({"plain": per_round([20.0, 10.0, 21.0]), "eagle": per_round([24.0, 12.0, 25.2], tau=1.3)},
                timing=TIMING, tau_key="tau", reused={"plain"})["eagle"]
    assert not u["speedup_paired"] and u["speedup_range"] == [0.6, 1.26]


def test_a_speedup_above_tau_by_more_than_its_spread_is_flagged():
    # plain measured while another process ran, in every round: 2.3x with 1.3 tokens per cycle is not speed
    noisy = combine({"plain": per_round([10.0, 11.0, 10.5]), "eagle": per_round([24.0, 25.0, 24.5], tau=1.3)},
                    timing=TIMING, tau_key="tau")["eagle"]
    assert noisy["suspicious"] is True
    assert "(!) eagle" in rounds_note({"eagle": noisy}, 3)
    # control: an honest run of the same draft is not flagged
    honest = combine({"plain": per_round([20.0, 21.0, 19.0]), "eagle": per_round([24.0, 25.0, 23.5], tau=1.3)},
                     timing=TIMING, tau_key="tau")["eagle"]
    assert honest["suspicious"] is False and "(!)" not in rounds_note({"eagle": honest}, 3)
    # above tau, but by less than its own spread: noise cannot be told from speed, not flagged
    assert is_suspicious([1.0, 1.35, 1.7], tau=1.3) is False
    assert is_suspicious([1.35, 1.35, 1.35], tau=1.3) is True  # no spread: any excess is flagged
    assert is_suspicious([1.35], tau=None) is None


def test_rounds_that_count_differently_are_reported():
    counts = per_round([20.0, 21.0], tau=1.5, cycles=80)
    counts[1]["cycles"] = 79
    s = combine({"plain": per_round([18.0, 18.0]), "eagle": counts}, timing=TIMING, tau_key="tau")
    assert s["eagle"]["rounds_agree"] is False and s["eagle"]["cycles"] == 80  # the first round's kept
    assert s["plain"]["rounds_agree"] is True
    note = rounds_note(s, 2)
    assert "DIFFER between rounds for: eagle" in note
    # control
    assert "the same in every round" in rounds_note({"plain": s["plain"]}, 2)
