"""Proposals step by step (modules/decode/proposals.py): context keys, the log file, the agreement of two sides, and
our decoders' per-cycle proposals (what tests/test_export_vllm_serving.py compares with vLLM's)."""
import pytest
import torch

from modules.decode.parallel import ParallelDecoder
from modules.decode.proposals import (ContextKey, ProposalLog, agreement, context_key, keyed, read_proposals)
from modules.decode.tree_decoding import EagleDecoder
from tests._helpers_decode import one_thread  # noqa: F401  (autouse fixture)
from tests._helpers_eagle import tiny_target
from tests.test_decode_lossless import tiny_pair
from tests.test_decode_parallel import tiny_parallel

K = 3


def test_a_key_grown_token_by_token_is_the_key_of_the_whole_context():
    ctx = [5, 0, 70000, 3, 3, 12]
    key = ContextKey()
    for i, t in enumerate(ctx):
        key.extend([t])
        assert key.key == context_key(ctx[:i + 1]) and key.length == i + 1
    grown = ContextKey(ctx[:2])
    grown.extend(ctx[2:])
    assert grown.key == context_key(ctx)
    # controls: another token, another order, one token more or less: another key
    others = [ctx[:-1] + [13], ctx[::-1], ctx + [0], ctx[:-1], [ctx[0] * 256] + ctx[1:]]
    assert len({context_key(c) for c in [ctx] + others}) == 1 + len(others)


def test_the_log_appends_and_reads_back_by_context(tmp_path):
    path = tmp_path / "p.jsonl"
    assert read_proposals(path) == {}
    first, second = ProposalLog(path), ProposalLog(path)  # two writers, one file (as several engine processes)
    first.write([(context_key([1, 2]), 2, [3, 4, 5]), (context_key([9]), 1, [8, 8, 8])])
    assert read_proposals(path) == {context_key([1, 2]): [3, 4, 5], context_key([9]): [8, 8, 8]}  # flushed
    second.write([(context_key([1, 2, 3]), 3, [4, 5, 6])])
    first.write([])
    first.write([(context_key([9]), 1, [7, 7, 7])])  # a context logged twice keeps its last proposal
    assert read_proposals(path) == {context_key([1, 2]): [3, 4, 5], context_key([9]): [7, 7, 7],
                                    context_key([1, 2, 3]): [4, 5, 6]}


def test_agreement_counts_first_tokens_and_chains_over_shared_contexts():
    ours = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9], "d": [1, 1, 1]}
    theirs = {"a": [1, 2, 3], "b": [4, 5, 0], "c": [0, 8, 9], "e": [5, 5, 5]}
    a = agreement(ours, theirs)
    assert (a.shared, a.first, a.chains, a.ours, a.theirs) == (3, 2, 1, 4, 4)
    assert a.first_share == pytest.approx(2 / 3) and a.chain_share == pytest.approx(1 / 3) and a.coverage == 0.75
    assert agreement(ours, ours).chain_share == 1.0
    longer = {k: v + [0] for k, v in ours.items()}  # another block size: same first tokens, no same chain
    assert (agreement(ours, longer).first_share, agreement(ours, longer).chain_share) == (1.0, 0.0)
    nothing = agreement(ours, {})
    assert (nothing.shared, nothing.first_share, nothing.chain_share) == (0, 0.0, 0.0)  # nothing shared: no pass


def test_keyed_follows_the_generated_tokens():
    prompt, tokens = [1, 2, 3], [4, 5, 6, 7]
    got = keyed(prompt, tokens, [(4, [9, 9, 9]), (6, [8, 8, 8]), (7, [6, 6, 6])])
    assert got == {context_key([1, 2, 3, 4]): [9, 9, 9], context_key([1, 2, 3, 4, 5, 6]): [8, 8, 8],
                   context_key([1, 2, 3, 4, 5, 6, 7]): [6, 6, 6]}
    with pytest.raises(ValueError, match="grow"):
        keyed(prompt, tokens, [(6, [1]), (4, [1])])


def proposals_of(decoder, prompt, max_new):
    r = decoder.generate(prompt, max_new)
    return r, keyed(prompt.tolist(), r.tokens, r.proposals)


def test_a_chain_decoders_proposal_depends_on_its_context_alone():
    """The premise of the step-by-step check: after the same context a draft proposes the same chain, whatever
    was accepted on the way there. Decoding from a prompt that IS an earlier context (its last token then comes from
    the prefill, not from a cycle) proposes that context's recorded chain. Control: another draft proposes others."""
    target, draft = tiny_pair("llama")
    prompt = torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(3))
    decoder = EagleDecoder(target, draft, total_tokens=K + 1, depth=K, top_k=1, record_proposals=True)
    r, ours = proposals_of(decoder, prompt, 40)
    assert len(r.proposals) == r.cycles and all(len(t) == K for _, t in r.proposals)
    assert [n for n, _ in r.proposals] == [len(prompt) + sum(r.accept_lengths[:i]) + 1 for i in range(r.cycles)]
    context = prompt.tolist() + r.tokens
    for n, chain in r.proposals[1::4]:
        again = decoder.generate(torch.tensor(context[:n - 1]), 2)  # the prefill chooses context[n - 1]
        assert again.proposals[0] == (n, chain)
    _, other = tiny_pair("llama", seed=5)
    _, theirs = proposals_of(EagleDecoder(target, other, total_tokens=K + 1, depth=K, top_k=1,
                                          record_proposals=True), prompt, 40)
    same, control = agreement(ours, ours), agreement(ours, theirs)
    assert same.chain_share == 1.0 and control.shared >= 10 and control.first_share < 0.2, control
    assert EagleDecoder(target, draft, total_tokens=K + 1, depth=K, top_k=1).generate(prompt, 10).proposals is None
    with pytest.raises(ValueError, match="chain"):
        EagleDecoder(target, draft, total_tokens=8, depth=K, top_k=2, record_proposals=True)


def test_parallel_and_hybrid_cycles():
    """A parallel drafter records its block; with the hybrid rule a lookup cycle records nothing (no draft ran)."""
    target = tiny_target("llama", num_hidden_layers=4).double()
    prompt = torch.randint(3, 300, (17,), generator=torch.Generator().manual_seed(5))
    r = ParallelDecoder(target, tiny_parallel(target, 4), record_proposals=True).generate(prompt, 30)
    assert len(r.proposals) == r.cycles and {len(t) for _, t in r.proposals} == {4}
    h = ParallelDecoder(target, tiny_parallel(target, 4), hybrid_min_match=2, record_proposals=True).generate(
        prompt, 30)
    assert any(h.from_lookup) and len(h.proposals) == h.from_lookup.count(False)
    plain = keyed(prompt.tolist(), r.tokens, r.proposals)
    assert agreement(plain, keyed(prompt.tolist(), h.tokens, h.proposals)).chain_share == 1.0
