"""Lossless speculative decoding with a parallel drafter (P-EAGLE): ONE draft forward per cycle.

The cycle of EagleDecoder (modules/decode/tree_decoding.py) with two changes:
  - the draft's catch-up forward over the accepted tokens also proposes the next K tokens. P-EAGLE
    (`mask_slot_block`): K-1 mask slots ride after the accepted tokens (the mask token, the projected
    mask feature, positions going on by one, causal attention); the last accepted slot predicts depth 1,
    mask slot j depth j+1, and the mask slots' cache entries are dropped afterwards (the next forward
    writes real tokens there). This is the input vLLM 0.32's proposer builds for `parallel_drafting`
    (modules/draft/peagle_draft.py has the table);
  - the "tree" is the chain of the K greedy proposals, verified in one target forward as before.
Greedy only (temperature 0). With lookup_tokens > 0 a prompt-lookup branch rides in the same verify
(a hybrid chain + lookup tree); with hybrid_min_match > 0 a lookup match replaces the block
(modules/decode/hybrid.py). The output equals plain greedy decoding whatever the draft proposes.

The draft plugs in through its kind's adapter (modules/draft/kinds.py: a kind with parallel = True),
which adds to DraftAdapter: `block_size` (K) and `propose_block(ids, feats, start, cache, masks)`: read
the accepted context (ids [1, L] at draft slots start.., feats [1, L, H_d]) into its cache and return
the hidden states [1, K, H_d] of the K proposed positions (depth 1..K; `logprobs` maps them).
P-EAGLE's step (mask slots after the context, causal attention) is `mask_slot_block` in modules/draft/peagle_draft.py.
Which decoder a draft gets is its kind's `parallel` (modules/draft/kinds.py), never what its adapter happens to define.
"""
import dataclasses

import torch

from modules.decode.tree import MaskBuffer, chain_tree
from modules.decode.tree_decoding import EagleDecoder, draft_kind, make_adapter


class ParallelDecoder(EagleDecoder):
    """Chain speculative decoding, one draft forward per cycle proposing the adapter's block_size tokens."""

    def __init__(self, target, draft, timing=False, lookup_tokens=0, lookup_ngram=3, hybrid_min_match=0,
                 record_proposals=False):
        """draft: a draft of a parallel kind, or its adapter (block_size, propose_block)."""
        kind = draft_kind(draft)
        if kind is not None and not kind.parallel:
            raise ValueError(f"a {kind.name} draft is not a parallel drafter (its kind is not parallel): "
                             f"use EagleDecoder")
        adapter = make_adapter(draft)
        self.block = int(adapter.block_size)
        super().__init__(target, adapter, total_tokens=self.block + 1, depth=self.block, top_k=1, temperature=0.0,
                         timing=timing, lookup_tokens=lookup_tokens, lookup_ngram=lookup_ngram,
                         hybrid_min_match=hybrid_min_match, record_proposals=record_proposals)

    def _buffers(self, P, max_new):
        """EagleDecoder's, with draft cache and mask rows for the K-1 mask slots after every catch-up."""
        buf = super()._buffers(P, max_new)
        extra = self.block - 1
        return dataclasses.replace(
            buf, dcache=self.adapter.new_cache(P + max_new + self.block + extra + 1),
            dmask=MaskBuffer(max(P, max_new + 1) + extra, P + max_new + self.block + extra + 1, self.device))

    def _draft_context(self, ids, feats, start, buf, result):
        """The accepted tokens ids [1, L] (slot convention of EAGLE: slot start + i reads token i and the
        target feature at that position) and the block proposal, in the adapter's ONE forward. Returns
        (hidden [1, K, H_d], log-probs [1, K, V_d]) of the K proposed positions."""
        t = self._clock()
        h = self.adapter.propose_block(ids, feats, start, buf.dcache, buf.dmask)
        lp = self.adapter.logprobs(h)
        result.draft_s += self._elapsed(t)
        return h, lp

    def _grow_tree(self, root, h_root, lp_block, n, depth, buf, result):
        """The chain root -> the block's greedy tokens (the first `depth` of them near the context end)."""
        proposals = self.adapter.to_target_ids(lp_block[:depth].argmax(-1))
        return chain_tree(torch.cat([root.view(1), proposals]))


def make_decoder(target, draft, total_tokens=16, depth=4, top_k=4, temperature=0.0, **options):
    """Our lossless decoder for any registered draft (or its kind's adapter): ParallelDecoder for a parallel kind
    (the tree shape does not apply, greedy only), else the EAGLE-2 tree decoder."""
    adapter, kind = make_adapter(draft), draft_kind(draft)
    if kind is not None and kind.parallel:
        if temperature > 0:
            raise ValueError("parallel drafting is decoded greedily here (temperature 0)")
        return ParallelDecoder(target, adapter, **options)
    return EagleDecoder(target, adapter, total_tokens=total_tokens, depth=depth, top_k=top_k,
                        temperature=temperature, **options)
