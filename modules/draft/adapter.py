"""The draft protocol of our decoders (modules/decode/): what the tree decoder needs from any draft.

Each kind returns its draft wrapped in a `DraftAdapter` subclass from `tree_adapter()` (modules/draft/kinds.py):
EAGLE-1/2 `Eagle2Adapter` (eagle_draft.py), EAGLE-3 `Eagle3Adapter` (eagle3_draft.py), P-EAGLE and DFlash theirs.
An EAGLE-3-style draft (fused aux-layer features, own vocabulary) sets:
  - `aux_layers = [low, mid, high]`: the decoder then runs the target with
    output_hidden_states=True and hands all hidden states to `target_features`;
  - `target_features(last_hidden, hidden_states)` returns
    fc(cat(hidden_states[i] for i in aux_layers)): the features already projected to the draft
    width, so `forward` receives the same kind of input for target features and for its own
    outputs (which EAGLE-3 feeds back unprojected);
  - `logprobs(hidden)` applies the draft's final norm and its own lm_head over the DRAFT vocab;
  - `to_target_ids(draft_ids)` returns draft_ids + d2t[draft_ids].
A parallel kind's adapter (`parallel = True` on the kind) adds `block_size` and `propose_block`
(modules/decode/parallel.py). The decoders import this layer, never the reverse (tests/test_imports_acyclic.py).
"""
from modules.kv_cache import TreeKVCache


class DraftAdapter:
    """What the tree decoder needs from a draft model (see the module docstring).

    Shapes: batch 1. `features` are in the draft's input space (width H_d); `forward` returns
    hidden states of the same width, which the decoder feeds back as the next step's features.
    """

    aux_layers = None  # None: the target's post-norm last hidden state; else hidden_states ids
    draft = None

    def check_target(self, target):
        """Raise ValueError when the draft does not fit this target."""

    def target_features(self, last_hidden, hidden_states):
        """Target outputs [1,T,H] (+ all hidden states when aux_layers) -> draft features [1,T,H_d]."""
        return last_hidden

    def new_cache(self, capacity):
        return TreeKVCache(self.draft.config.num_hidden_layers, capacity)

    def forward(self, input_ids, features, position_ids, attention_mask, cache):
        """input_ids [1,T] target ids (token t+1), features [1,T,H_d] (feature t), position_ids
        [1,T], attention_mask [1,1,T,past+T] bool (True = attend), cache updated in place.
        Returns hidden [1,T,H_d]."""
        raise NotImplementedError

    def logprobs(self, hidden):
        """hidden [..., H_d] -> float32 log-probabilities over the draft vocab [..., V_d]."""
        raise NotImplementedError

    def to_target_ids(self, draft_ids):
        """Draft-vocab ids -> target-vocab ids (identity when the vocabularies are the same)."""
        return draft_ids
