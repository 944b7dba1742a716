"""The simulated-tau evaluation of a draft trained with --attn flash_attention_2 (picked
automatically when flash_attn is installed): its chain steps need a 4D mask, which flash attention
would read as a padding mask, so the evaluation runs the draft through SDPA and gives SDPA's
result. On CPU (no flash_attn) the flash path cannot run at all, so reaching it fails the test."""
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modules.data.collate import EagleCollator
from modules.draft.eagle_draft import EagleDraft
from modules.training.eagle_trainer import attention_for_4d_masks, simulated_acceptance
from tests._helpers_eagle import fake_items, tiny_target


def _draft(target, attn):
    torch.manual_seed(0)
    return EagleDraft.from_target(target, attn_implementation=attn).eval()


def test_flash_attention_draft_is_evaluated_through_sdpa(monkeypatch):
    target = tiny_target("llama", seed=0)
    batch = EagleCollator()(fake_items(target, n=3))
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    expected = simulated_acceptance(_draft(target, "sdpa"), batch, 3)

    used = []
    for name in ("sdpa", "flash_attention_2"):
        if name in ALL_ATTENTION_FUNCTIONS:
            def record(*a, _name=name, _fn=ALL_ATTENTION_FUNCTIONS[name], **kw):
                used.append(_name)
                return _fn(*a, **kw)
            monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, record)
    flash = _draft(target, "flash_attention_2")
    got = simulated_acceptance(flash, batch, 3)
    assert used and set(used) == {"sdpa"}
    assert [int(x) for x in got] == [int(x) for x in expected] and int(expected[1]) > 0
    assert flash.config._attn_implementation == "flash_attention_2"  # the draft's setting is back


def test_only_padding_mask_implementations_are_rerouted():
    target = tiny_target("llama", seed=0)
    for attn, inside in (("flash_attention_2", "sdpa"), ("sdpa", "sdpa"), ("eager", "eager")):
        draft = _draft(target, attn)
        with attention_for_4d_masks(draft):
            assert draft.config._attn_implementation == inside, attn
        assert draft.config._attn_implementation == attn
