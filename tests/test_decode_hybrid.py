"""The hybrid rule (modules/decode/hybrid.py): a lookup match of >= min_match tokens replaces the draft's K tokens;
requests choose independently; the decoder's chain mode with the rule stays lossless and follows the rule."""
import pytest
import torch

from modules.decode.hybrid import LONGEST_MATCH, HybridLookup
from modules.decode.tree_decoding import EagleDecoder
from modules.decode.parallel import ParallelDecoder
from tests._helpers_decode import plain_greedy
from tests.test_decode_lossless import tiny_pair
from tests.test_decode_parallel import tiny_parallel
from tests._helpers_eagle import tiny_target


def brute_force(ctx, k, min_match):
    """The rule written out: the longest suffix (<= LONGEST_MATCH, >= min_match) seen earlier, its most recent
    occurrence, the k tokens after it read on through the proposal itself; None without a match."""
    for n in range(min(LONGEST_MATCH, len(ctx) - 1), min_match - 1, -1):
        for s in range(len(ctx) - n - 1, -1, -1):
            if ctx[s:s + n] == ctx[-n:]:
                ext = list(ctx)
                for j in range(s + n, s + n + k):
                    ext.append(ext[j])
                return ext[len(ctx):]
    return None


def test_lookup_equals_the_rule_written_out_as_the_context_grows():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 5, (400,), generator=g).tolist()
    for min_match in (1, 2, 4):
        rule = HybridLookup(num_tokens=3, min_match=min_match)
        rule.reset(ctx[:6])
        used = 0
        for end in range(6, 400, 5):
            rule.extend(ctx[len(rule.context):end])
            want = brute_force(ctx[:end], 3, min_match)
            assert rule.lookup() == want, (min_match, end)
            draft = [901, 902, 903]
            tokens, from_lookup = rule.select(draft)
            assert (tokens, from_lookup) == ((want, True) if want is not None else (draft, False))
            used += from_lookup
        assert 0 < used < 79  # both branches of the rule are exercised


def test_min_match_decides_and_a_loop_reads_on():
    rule = HybridLookup(num_tokens=4, min_match=3)
    rule.reset([5, 6, 7, 8, 1, 2, 9, 6, 7])  # "6 7" seen before: a match of 2 < 3
    assert rule.select([0, 0, 0, 0]) == ([0, 0, 0, 0], False)
    rule.extend([8])                          # "6 7 8" seen before: 3 tokens, the 4 that followed are used
    assert rule.select([0, 0, 0, 0]) == ([1, 2, 9, 6], True)
    loop = HybridLookup(num_tokens=5, min_match=2)
    loop.reset([3, 1, 2, 1, 2, 1, 2])         # period 2: the occurrence runs into the end, the loop goes on
    assert loop.lookup() == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="min_match"):
        HybridLookup(num_tokens=3, min_match=LONGEST_MATCH + 1)


def test_requests_choose_independently():
    """Two requests in one batch: each one's choice depends on its own context only."""
    repeat, fresh = HybridLookup(3, 2), HybridLookup(3, 2)
    repeat.reset([10, 11, 12, 13, 10, 11])
    fresh.reset([20, 21, 22, 23, 24, 25])
    drafts = [[7, 7, 7], [8, 8, 8]]
    assert [r.select(d) for r, d in zip((repeat, fresh), drafts)] == [([12, 13, 10], True), ([8, 8, 8], False)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("min_match", [1, 2, 4])
def test_chain_with_the_rule_is_lossless_and_follows_it(family, min_match):
    """The decoder's chain mode with the rule: output = plain greedy; every cycle where the rule matched verified
    the lookup's tokens and accepted what the rule predicts; tiny random targets loop, so it accepts more."""
    target, draft = tiny_pair(family)
    prompt = torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(3))
    ref = plain_greedy(target, prompt, 60)
    k = 3
    alone = EagleDecoder(target, draft, total_tokens=k + 1, depth=k, top_k=1).generate(prompt, 60)
    hybrid = EagleDecoder(target, draft, total_tokens=k + 1, depth=k, top_k=1,
                          hybrid_min_match=min_match).generate(prompt, 60)
    assert hybrid.tokens == alone.tokens == ref
    assert len(hybrid.from_lookup) == len(hybrid.accept_lengths) and any(hybrid.from_lookup)
    # replay the rule on the accepted tokens: where it matched, the decoder accepted the lookup's agreeing prefix
    rule, done = HybridLookup(k, min_match), 0
    rule.reset(prompt.tolist() + ref[:1])
    for used, length in zip(hybrid.from_lookup, hybrid.accept_lengths):
        chain = rule.lookup()
        assert used == (chain is not None)
        future = ref[1 + done:]
        if used and len(future) > len(chain):  # (the last cycle is cut at max_new_tokens)
            agree = next((i for i, (a, b) in enumerate(zip(chain, future)) if a != b), len(chain))
            assert length == agree + 1
        done += length
        rule.extend(ref[len(rule.context) - len(prompt):1 + done])
    assert hybrid.tau > alone.tau + 0.3, (hybrid.tau, alone.tau)


def test_the_rule_in_a_parallel_drafter_and_its_refusals():
    target = tiny_target("llama", num_hidden_layers=4).double()
    draft = tiny_parallel(target, 3)
    prompt = torch.randint(3, 300, (17,), generator=torch.Generator().manual_seed(5))
    ref = plain_greedy(target, prompt, 40)
    res = ParallelDecoder(target, draft, hybrid_min_match=2).generate(prompt, 40)
    assert res.tokens == ref and any(res.from_lookup)
    t2, d2 = tiny_pair("llama")
    with pytest.raises(ValueError, match="greedy"):
        EagleDecoder(t2, d2, temperature=0.7, hybrid_min_match=2)
    with pytest.raises(ValueError, match="pick one"):
        EagleDecoder(t2, d2, lookup_tokens=4, hybrid_min_match=2)
    with pytest.raises(ValueError, match="min_match"):
        EagleDecoder(t2, d2, hybrid_min_match=99)
