"""Parallel drafting (P-EAGLE, DFlash): our decoder is lossless on tiny Llama and Qwen2 targets, proposes whole
blocks when the draft is right, and its one-forward block equals what training unrolls (what we train is what
we decode, and what vLLM's proposers build: modules/draft/peagle_draft.py, dflash_draft.py)."""
import pytest
import torch

from modules.decode.parallel import ParallelDecoder
from modules.draft.peagle_draft import mask_slot_block
from modules.decode.tree_decoding import EagleDecoder
from modules.decode.tree import MaskBuffer
from modules.training.ttt_trainer import TTTUnroll
from modules.draft import kinds as draft_kinds
from tests._helpers_decode import OracleAdapter, one_thread, plain_greedy  # noqa: F401
from tests._helpers_eagle import tiny_target

AUX = [1, 2, 3]


PARALLEL = [name for name in draft_kinds.KINDS if draft_kinds.get(name).parallel]  # peagle, dflash


def tiny_parallel(target, block, kind="peagle", seed=1):
    """A random parallel draft for a tiny 4-layer target (float64, as the target), draft vocab = every 2nd id."""
    torch.manual_seed(seed)
    draft = draft_kinds.get(kind).build(target, draft_ids=torch.arange(0, 300, 2), aux_layers=AUX,
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


@pytest.mark.parametrize("kind", PARALLEL)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("block,lookup", [(1, 0), (3, 0), (5, 0), (4, 6)])
def test_random_parallel_draft_is_lossless(kind, family, block, lookup):
    target = tiny_target(family, num_hidden_layers=4).double()
    draft = tiny_parallel(target, block, kind)
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
    draft = tiny_parallel(target, 4)
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


@pytest.mark.parametrize("kind", PARALLEL)
def test_the_decoders_block_equals_the_training_unroll(kind):
    """For every kind: the decoder's block step (adapter.propose_block over the context up to slot t) gives the
    hidden states the trainer's unroll gives at origin t, step by step."""
    target = tiny_target("qwen2", num_hidden_layers=4).double()
    draft = tiny_parallel(target, 3, kind)
    adapter = draft_kinds.kind_of(draft).tree_adapter(draft)
    ids = torch.randint(3, 300, (1, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hs = target(ids, output_hidden_states=True).hidden_states
        slot_ids, feats = ids[:, 1:], torch.cat([hs[i] for i in AUX], dim=-1)[:, :-1]
        steps, T = draft.parallel_tokens, slot_ids.shape[1]
        k, b, t = torch.meshgrid(torch.arange(steps), torch.zeros(1, dtype=torch.long), torch.arange(T), indexing="ij")
        select = (k.flatten(), b.flatten(), t.flatten())
        h, _ = TTTUnroll(draft)(slot_ids, feats, torch.ones_like(slot_ids), steps, select)
        h = h.view(steps, T, -1)
        ctx = adapter.target_features(None, hs)[:, :-1]
        for origin in (0, 6, 12):
            cache, masks = adapter.new_cache(64), MaskBuffer(32, 64, "cpu")
            block = adapter.propose_block(slot_ids[:, :origin + 1], ctx[:, :origin + 1], 0, cache, masks)
            torch.testing.assert_close(block[0], h[:, origin])


def test_a_parallel_draft_is_also_lossless_in_the_tree_decoder():
    """The kind's adapter is an EAGLE-3 one: the tree decoder accepts it (a sequential use it was not trained for)."""
    target = tiny_target("llama", num_hidden_layers=4).double()
    draft = tiny_parallel(target, 3)
    prompt = torch.randint(3, 300, (9,), generator=torch.Generator().manual_seed(2))
    res = EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2).generate(prompt, 16)
    assert res.tokens == plain_greedy(target, prompt, 16)


def test_make_decoder_picks_by_the_adapter():
    from modules.decode.parallel import make_decoder
    from tests._helpers_eagle3 import tiny_eagle3
    target = tiny_target("llama", num_hidden_layers=4)
    assert type(make_decoder(target, tiny_parallel(target, 3).float())).__name__ == "ParallelDecoder"
    assert type(make_decoder(target, tiny_eagle3(target), total_tokens=8, depth=3, top_k=2)) is EagleDecoder
    with pytest.raises(ValueError, match="greedily"):
        make_decoder(target, tiny_parallel(target, 3).float(), temperature=0.7)
