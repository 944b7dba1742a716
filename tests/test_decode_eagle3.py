"""EAGLE-3 drafts in the EAGLE-2 tree decoder: lossless (same tokens as plain greedy), and an
EAGLE-3 draft that copies the target's own head accepts whole trees."""
import torch

from modules.decode.tree_decoding import EagleDecoder
from tests._helpers_decode import plain_greedy
from tests._helpers_eagle3 import VOCAB, tiny_eagle3, tiny_target


def test_random_eagle3_draft_is_lossless():
    target = tiny_target(seed=3)
    draft = tiny_eagle3(target, seed=4).eval()
    prompt = torch.randint(3, VOCAB, (9,))
    ref = plain_greedy(target, prompt, 16)
    for total, depth, k in [(8, 3, 2), (16, 5, 4)]:
        res = EagleDecoder(target, draft, total_tokens=total, depth=depth, top_k=k).generate(prompt, 16)
        assert res.tokens == ref
        assert sum(res.accept_lengths) + 1 == len(res.tokens)  # the prefill token + every cycle


def test_draft_vocab_mapping_reaches_target_ids():
    """A draft whose vocab is a subset: proposed tokens are target ids (d2t applied), so when the
    draft agrees with the target, whole paths are accepted."""
    target = tiny_target(seed=5)
    prompt = torch.randint(3, VOCAB, (6,))
    ref = plain_greedy(target, prompt, 16)
    ids = torch.tensor(sorted(set(ref) | set(range(0, VOCAB, 7))))
    draft = tiny_eagle3(target, draft_ids=ids, seed=6).eval()
    # make the draft an (approximate) copy of the target: midlayer contributes nothing, fc picks the
    # highest aux layer, and norm/lm_head = the target's final norm and head rows.
    with torch.no_grad():
        for p in draft.midlayer.parameters():
            p.zero_()
        h = target.config.hidden_size
        draft.fc.weight.zero_()
        draft.fc.weight[:, 2 * h:] = torch.eye(h)
        draft.lm_head.weight.copy_(target.lm_head.weight[ids])
    # hidden_states[4] is the target's normed output: the draft's norm (weight 1) only rescales it,
    # which leaves the argmax of the head unchanged.
    draft.config.eagle_config = {"eagle_aux_hidden_state_layer_ids": [1, 2, 4]}
    res = EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2).generate(prompt, 16)
    assert res.tokens == ref
    assert res.tau > 1.5
