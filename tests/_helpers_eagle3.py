"""Tiny random targets/drafts for the EAGLE-3 tests (hidden 64, 4 layers, vocab 300)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modules.draft.eagle3_draft import Eagle3Draft, make_eagle3_config

VOCAB = 300
AUX = [1, 2, 3]


def tiny_target_config(rope_theta=10000.0, **kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_target(seed=0, **kw):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_target_config(**kw)).eval()
    model.requires_grad_(False)
    return model


def tiny_eagle3(target=None, draft_ids=None, seed=1):
    """An Eagle3Draft for `target` (a tiny LlamaForCausalLM); draft vocab = every 3rd id by default."""
    torch.manual_seed(seed)
    if target is None:
        cfg = make_eagle3_config(tiny_target_config(), VOCAB // 3 if draft_ids is None else len(draft_ids), AUX)
        draft = Eagle3Draft(cfg)
        draft.set_draft_vocab(torch.arange(0, VOCAB, 3) if draft_ids is None else draft_ids)
        return draft
    ids = torch.arange(0, VOCAB, 3) if draft_ids is None else draft_ids
    return Eagle3Draft.from_target(target, draft_ids=ids, aux_layers=AUX)
