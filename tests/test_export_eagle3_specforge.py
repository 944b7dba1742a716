"""Our EAGLE-3 export loads in specforge 0.2.0's LlamaForCausalLMEagle3 (an independent
implementation): every key is used, and logits, plain and over 3 TTT steps, are equal."""
import pytest
import torch

pytest.importorskip("specforge", reason="interop test needs `pip install --no-deps specforge==0.2.0`")

from modules.draft.ttt_attention import TTTCache, step0_mask  # noqa: E402
from tests._helpers_eagle3 import VOCAB, tiny_eagle3, tiny_target  # noqa: E402


@pytest.fixture
def no_compile():
    """specforge wraps RMSNorm/rotary in torch.compile: minutes on CPU for a 1-second test."""
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def test_specforge_loads_export_with_same_logits(tmp_path, no_compile):
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3, prepare_decoder_attention_mask

    draft = tiny_eagle3(tiny_target(rope_theta=50000.0))  # non-default theta must survive the trip
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    draft.save_pretrained(tmp_path)
    theirs, info = LlamaForCausalLMEagle3.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # transformers 5.19 leaves specforge's rotary cache non-finite after from_pretrained
    theirs.midlayer.self_attn._init_rope()
    theirs.eval()
    assert torch.equal(theirs.d2t, draft.d2t) and torch.equal(theirs.t2d, draft.t2d)

    B, T = 2, 11
    ids = torch.randint(0, VOCAB, (B, T))
    fused = torch.randn(B, T, 192)
    pos = torch.arange(T)[None]
    mask = prepare_decoder_attention_mask(torch.ones(B, T, dtype=torch.bool), (B, T), fused, 0)
    with torch.no_grad():
        h_theirs = theirs.backbone(theirs.embed_input_ids(ids), theirs.project_hidden_states(fused), None, mask, pos)
        h_ours = draft(ids, fused)
        torch.testing.assert_close(draft.compute_logits(h_ours), theirs.compute_logits(h_theirs), atol=1e-5, rtol=1e-4)

        # training-time test: their cache_hidden path against our TTT steps
        cache_theirs, cache_ours = [[], []], TTTCache()
        mask0 = step0_mask(None, T, ids.device)
        h_t = theirs.project_hidden_states(fused)
        h_o = fused
        for step in range(3):
            step_ids = torch.roll(ids, -step, dims=1)
            h_t = theirs.backbone(theirs.embed_input_ids(step_ids), h_t, cache_theirs, mask, pos)
            h_o = draft.ttt_step(step_ids, h_o, cache_ours, mask0, step)
            torch.testing.assert_close(draft.compute_logits(h_o), theirs.compute_logits(h_t), atol=1e-5, rtol=1e-4)
