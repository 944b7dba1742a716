"""Parallel drafting (P-EAGLE): our decoder is lossless on tiny Llama and Qwen2 targets, proposes whole
blocks when the draft is right, and its one-forward block equals what training unrolls (modules/draft/
peagle_draft.py: what we train is what we serve)."""
import pytest
import torch

from modules.decode.parallel import ParallelDecoder, mask_slot_block
from modules.decode.tree_decoding import EagleDecoder
from modules.draft.ttt_attention import TTTCache, step0_mask
from modules.draft import kinds as draft_kinds
from tests._helpers_decode import OracleAdapter, one_thread, plain_greedy  # noqa: F401
from tests._helpers_eagle import tiny_target

AUX = [1, 2, 3]


def tiny_peagle(target, block, seed=1):
    """A random P-EAGLE draft for a tiny 4-layer target (float64, as the target), draft vocab = every 2nd id."""
    torch.manual_seed(seed)
    draft = draft_kinds.get("peagle").build(target, draft_ids=torch.arange(0, 300, 2), aux_layers=AUX,
                                            parallel_tokens=block)
    return draft.double().eval()


class ParallelOracle(OracleAdapter):
    """The oracle of _helpers_decode as a parallel drafter: mask slot p predicts seq[p + 2] like any slot."""

    def __init__(self, seq, vocab_size, block, hidden_size):
        super().__init__(seq, vocab_size)
        self.block_size, self.hidden_size = block, hidden_size

    def propose_block(self, ids, feats, start, cache, masks):
        extra = self.block_size - 1
        return mask_slot_block(self, ids, feats, start, cache, masks, torch.zeros(1, extra, dtype=torch.long),
                               torch.zeros(1, extra, self.hidden_size))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("block,lookup", [(1, 0), (3, 0), (5, 0), (4, 6)])
def test_random_parallel_draft_is_lossless(family, block, lookup):
    target = tiny_target(family, num_hidden_layers=4).double()
    draft = tiny_peagle(target, block)
    g = torch.Generator().manual_seed(3)
    prompt = torch.cat([torch.randint(3, 300, (12,), generator=g)] * 2)  # repeats: the lookup branch hits
    ref = plain_greedy(target, prompt, 40)
    res = ParallelDecoder(target, draft, lookup_tokens=lookup).generate(prompt, 40)
    assert res.tokens == ref
    assert sum(res.accept_lengths) + 1 >= len(res.tokens)  # the prefill token + every cycle (the last one cut)
    assert max(res.accept_lengths) <= block + 1 + lookup


@pytest.mark.parametrize("block", [2, 4])
def test_oracle_fills_every_block(block):
    target = tiny_target("qwen2", num_hidden_layers=4).double()
    prompt = torch.arange(30, 50)
    cont = plain_greedy(target, prompt, 41)
    oracle = ParallelOracle(prompt.tolist() + cont, 300, block, target.config.hidden_size)
    res = ParallelDecoder(target, oracle).generate(prompt, 41)
    assert res.tokens == cont
    assert res.accept_lengths[:-1] == [block + 1] * (len(res.accept_lengths) - 1)  # the last one meets the end


def test_eos_and_context_end():
    target = tiny_target("llama", num_hidden_layers=4, max_position_embeddings=40).double()
    draft = tiny_peagle(target, 4)
    prompt = torch.arange(5, 30)
    ref = plain_greedy(target, prompt, 15)
    assert ParallelDecoder(target, draft).generate(prompt, 100).tokens == ref  # stops at the context end
    eos = ref[6]
    assert ParallelDecoder(target, draft).generate(prompt, 100, eos_token_id=eos).tokens == ref[:ref.index(eos) + 1]


def test_sequential_drafts_are_refused():
    from tests._helpers_eagle3 import tiny_eagle3
    target = tiny_target("llama", num_hidden_layers=4)
    with pytest.raises(ValueError, match="not a parallel drafter"):
        ParallelDecoder(target, tiny_eagle3(target))


def test_block_forward_equals_the_training_unroll():
    """Step k of the TTT unroll at origin t (mask inputs after step 0) == the decoder's block forward over
    the context up to t plus k mask slots: the input layout trained is the one decoded (and served)."""
    target = tiny_target("llama", num_hidden_layers=4).double()
    draft = tiny_peagle(target, 4)
    ids = torch.randint(3, 300, (1, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hs = target(ids, output_hidden_states=True).hidden_states
        fused = torch.cat([hs[i] for i in AUX], dim=-1)
        # training: slot t reads token x_{t+1} and fused feature a_t (modules/training/ttt_trainer.py)
        slot_ids, feats = ids[:, 1:], fused[:, :-1]
        cache, h, outs = TTTCache(), feats, []
        mask0 = step0_mask(None, slot_ids.shape[1], slot_ids.device)
        for k in range(draft.parallel_tokens):
            h = draft.ttt_step(slot_ids, h, cache, mask0, k)
            outs.append(h)
        for t in (0, 6, 12):
            m_ids, m_feats = draft.mask_inputs(1, draft.parallel_tokens - 1)
            x = torch.cat([slot_ids[:, :t + 1], m_ids], 1)
            f = torch.cat([draft.fc(feats[:, :t + 1]), m_feats], 1)
            block = draft(x, f, fused=False)[0, t:]
            for k in range(draft.parallel_tokens):
                torch.testing.assert_close(block[k], outs[k][0, t])


def test_a_parallel_draft_is_also_lossless_in_the_tree_decoder():
    """The kind's adapter is an EAGLE-3 one: the tree decoder accepts it (a sequential use it was not trained for)."""
    target = tiny_target("llama", num_hidden_layers=4).double()
    draft = tiny_peagle(target, 3)
    prompt = torch.randint(3, 300, (9,), generator=torch.Generator().manual_seed(2))
    res = EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2).generate(prompt, 16)
    assert res.tokens == plain_greedy(target, prompt, 16)
