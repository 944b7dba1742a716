"""The P-EAGLE draft: an EAGLE-3 draft that proposes K tokens in ONE forward (parallel drafting).

The layout is EAGLE-3's (modules/draft/eagle3_draft.py) plus two inputs for the positions whose token
and target feature are not known yet:
  - `mask_hidden`, a learned vector in the FUSED feature space [3H], projected by the same fc as real
    fused features (vLLM: the proposer copies combine_hidden_states(mask_hidden) into its hidden buffer);
  - `mask_token_id`, a fixed token whose (frozen, the target's) embedding stands in for the token.

One draft forward per cycle, with the last accepted token x_n at position n-1 (slot n-1 reads token
x_n and the target feature of position n-1, as in EAGLE-3):

    slot      n-1            n                   n+1         ...  n+K-2
    token     x_n            mask                mask             mask
    feature   fc(a_{n-1})    fc(mask_hidden)     fc(mask_hidden)  fc(mask_hidden)
    predicts  x_{n+1}        x_{n+2}             x_{n+3}          x_{n+K}

with causal attention over the accepted context and the slots before. That is what vLLM 0.32 builds
for `"method": "eagle3"` with `parallel_drafting: true` (v1/spec_decode/llm_base_proposer.py
set_inputs_first_pass, v1/spec_decode/utils.py copy_and_expand_eagle_inputs_kernel: the bonus slot
keeps the real feature, the K-1 slots after it take the mask token and mask hidden, positions go on
by one; model_executor/models/llama_eagle3.py loads `mask_hidden` [1, fc input size]).

Training is the TTT unroll of EAGLE-3 (modules/training/ttt_trainer.py) with one change in
`ttt_step`: step k >= 1 reads the mask token and fc(mask_hidden) instead of the data token and the
draft's own previous output. The TTT attention (modules/draft/ttt_attention.py) already gives the
step-k query at slot t the real keys 0..t plus the step-1..k keys at slot t, at positions t+1..t+k:
exactly the mask slots above. So what is trained is what vLLM serves, and the unroll has K steps
(`parallel_draft_tokens` in the config, set by train_eagle_ttt.py --parallel-tokens).
"""
from dataclasses import dataclass

import torch
from torch import nn

from modules.draft.eagle3_draft import Eagle3Adapter, Eagle3Draft, Eagle3Kind, Eagle3Options, export_eagle3
from modules.draft.kinds import ParallelOptions
from modules.export import engines

PARALLEL_KEY = engines.PARALLEL_TOKENS_KEY  # K: tokens proposed per draft forward (= vLLM's num_speculative_tokens)


def default_mask_token(config) -> int:
    """The target's pad token, else its EOS, else 0: any fixed id works (the mask slots also differ by
    mask_hidden); a token that rarely appears as context keeps the two roles apart."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


class PEagleDraft(Eagle3Draft):
    def __init__(self, config):
        super().__init__(config)
        if getattr(config, PARALLEL_KEY, None) is None:
            setattr(config, PARALLEL_KEY, 4)
        if getattr(config, "mask_token_id", None) is None:
            config.mask_token_id = default_mask_token(config)
        # vLLM holds it as [1, fc input size]; ours is the same tensor, trained
        self.mask_hidden = nn.Parameter(torch.empty(1, self.fc.in_features))
        nn.init.normal_(self.mask_hidden, std=getattr(config, "initializer_range", 0.02))

    @property
    def parallel_tokens(self) -> int:
        return int(getattr(self.config, PARALLEL_KEY))

    @property
    def mask_token_id(self) -> int:
        return int(self.config.mask_token_id)

    def mask_inputs(self, batch, length):
        """(mask token ids [batch, length], projected mask features [batch, length, h]) for the
        positions not known yet."""
        ids = torch.full((batch, length), self.mask_token_id, dtype=torch.long, device=self.mask_hidden.device)
        g = self.project(self.mask_hidden)
        return ids, g.view(1, 1, -1).expand(batch, length, -1)

    def ttt_step(self, input_ids, hidden_states, cache, mask0, step):
        """Step 0 as EAGLE-3 (real token, fused features); step k >= 1: every slot reads the mask
        token and fc(mask_hidden) at position t + k (the k-th mask slot after origin t)."""
        if step == 0:
            return super().ttt_step(input_ids, hidden_states, cache, mask0, step)
        ids, g = self.mask_inputs(*input_ids.shape)
        return super().ttt_step(ids, g, cache, mask0, step)

    def serving_tensors(self, with_embed=True):
        return {**super().serving_tensors(with_embed=with_embed), "mask_hidden": self.mask_hidden}

    def config_dict(self, dtype=None) -> dict:
        """EAGLE-3's config plus the parallel-drafting fields (modules/export/engines.py: what vLLM reads)."""
        cfg = super().config_dict(dtype)
        cfg.update(engines.parallel_drafting_fields(self.parallel_tokens, self.mask_token_id, self.config.vocab_size))
        return cfg


class PEagleAdapter(Eagle3Adapter):
    """P-EAGLE in our decoder (modules/decode/parallel.py): the EAGLE-3 adapter plus the block inputs."""

    @property
    def block_size(self):
        return self.draft.parallel_tokens

    def propose_block(self, ids, feats, start, cache, masks):
        mask_ids, mask_feats = self.draft.mask_inputs(1, self.block_size - 1)
        return mask_slot_block(self, ids, feats, start, cache, masks, mask_ids, mask_feats)


def mask_slot_block(adapter, ids, feats, start, cache, masks, mask_ids, mask_feats):
    """P-EAGLE's block step: the context ids [1, L] / feats [1, L, H_d] at slots start.., then the mask
    slots (mask_ids [1, K-1], mask_feats [1, K-1, H_d]) in one causal forward (adapter.forward). The cache
    keeps the context only. Returns the hidden states of the last context slot and the mask slots [1, K, H_d]."""
    L, extra = ids.shape[1], mask_ids.shape[1]
    ids = torch.cat([ids, mask_ids.to(ids.device)], dim=1)
    feats = torch.cat([feats, mask_feats.to(feats.dtype)], dim=1)
    pos = torch.arange(start, start + L + extra, device=ids.device).unsqueeze(0)
    h = adapter.forward(ids, feats, pos, masks.causal_after(start, L + extra), cache)
    cache.truncate(start + L)  # the mask slots are no context
    return h[:, L - 1:]


@dataclass
class PEagleOptions(ParallelOptions, Eagle3Options):
    """P-EAGLE's build options: its block size, and EAGLE-3's own."""


class PEagleKind(Eagle3Kind):
    """P-EAGLE: EAGLE-3 trained to fill K positions in one forward (mask token + learned mask_hidden)."""

    name = "peagle"
    draft_class = PEagleDraft
    parallel = True
    options = PEagleOptions

    def owns_config(self, config):
        return bool(config.get("parallel_drafting")) and config.get("eagle_version") == 3

    def build(self, target, draft_ids=None, aux_layers=None, weights=None, parallel_tokens=None,
              mask_token_id=None, eagle31_norms=False, **_):
        draft = self.draft_class.from_target(target, draft_ids=draft_ids, aux_layers=aux_layers,
                                             load_weights=weights is None, eagle31_norms=eagle31_norms)
        if weights is not None:
            draft.load_target_weights(*weights)
        if parallel_tokens is not None:
            if parallel_tokens < 1:
                raise ValueError(f"parallel_tokens must be >= 1, got {parallel_tokens}")
            setattr(draft.config, PARALLEL_KEY, int(parallel_tokens))
        if mask_token_id is not None:
            draft.config.mask_token_id = int(mask_token_id)
        return draft

    def unroll_steps(self, draft, requested):
        return draft.parallel_tokens

    def vllm_speculative_config(self, folder, num_tokens):
        """vLLM serves P-EAGLE as eagle3 + parallel_drafting (modules/export/engines.py); num_tokens should be
        the block the draft was trained for (its config's parallel_draft_tokens)."""
        return {**super().vllm_speculative_config(folder, num_tokens), "parallel_drafting": True}

    def tree_adapter(self, draft, vocab_ids=None):
        if vocab_ids is not None:
            raise ValueError("a P-EAGLE draft proposes from its own draft vocabulary (d2t): no vocab_ids")
        return PEagleAdapter(draft)

    def export(self, draft, out_dir, target=None, dtype=torch.bfloat16):
        if not isinstance(draft, self.draft_class):  # a folder: export_eagle3 would read it as plain EAGLE-3
            draft = self.draft_class.from_pretrained(draft, target=target)
        return export_eagle3(draft, out_dir, target=target, dtype=dtype)


KIND = PEagleKind()
