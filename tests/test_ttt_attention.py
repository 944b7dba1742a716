"""TTT attention against a naive reference that materialises each position's key sequence."""
import torch

from modules.ttt_attention import TTTCache, run_attention, step0_mask, ttt_scores_softmax_output
from tests._helpers_eagle3 import VOCAB, tiny_eagle3


def naive_ttt(q, keys, values, lengths, scale):
    """For every (batch, position): keys = step-0 keys 0..t (t < length) then step-j key at t."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            visible = min(t + 1, lengths[b]) if t < lengths[b] else t + 1
            ks = [keys[0][b, :, s] for s in range(visible) if s < lengths[b]]
            vs = [values[0][b, :, s] for s in range(visible) if s < lengths[b]]
            ks += [k[b, :, t] for k in keys[1:]]
            vs += [v[b, :, t] for v in values[1:]]
            K, V = torch.stack(ks, 1), torch.stack(vs, 1)  # [H, n, d]
            p = torch.softmax((q[b, :, t, None, :] * K).sum(-1) * scale, -1)  # [H, n]
            out[b, :, t] = (p[..., None] * V).sum(1)
    return out


def test_matches_naive_reference_with_padding():
    torch.manual_seed(0)
    B, H, T, d, steps = 2, 3, 7, 8, 4
    keys = [torch.randn(B, H, T, d) for _ in range(steps)]
    values = [torch.randn(B, H, T, d) for _ in range(steps)]
    q = torch.randn(B, H, T, d)
    lengths = [7, 5]
    pad = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    for k in range(1, steps + 1):
        ours = ttt_scores_softmax_output(q, keys[:k], values[:k], step0_mask(pad, T, q.device), d ** -0.5)
        ref = naive_ttt(q, keys[:k], values[:k], lengths, d ** -0.5)
        torch.testing.assert_close(ours[0], ref[0])
        torch.testing.assert_close(ours[1, :, :5], ref[1, :, :5])  # padded queries are never used


def test_step0_equals_plain_causal_forward_and_gradients_flow():
    draft = tiny_eagle3()
    ids = torch.randint(0, VOCAB, (2, 10))
    fused = torch.randn(2, 10, 192)
    cache = TTTCache()
    mask0 = step0_mask(None, 10, ids.device)
    h0 = draft.ttt_step(ids, fused, cache, mask0, step=0)
    torch.testing.assert_close(h0, draft(ids, fused), atol=1e-5, rtol=1e-5)
    h = h0
    for k in range(1, 4):
        h = draft.ttt_step(ids, h, cache, mask0, step=k)
    assert len(cache) == 4
    draft.compute_logits(h).logsumexp(-1).sum().backward()
    for name, p in draft.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_run_attention_on_a_hf_llama_attention_module():
    """The EAGLE-1/2 path: a transformers LlamaAttention driven step by step."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    from tests._helpers_eagle3 import tiny_target_config
    cfg = tiny_target_config()
    cfg._attn_implementation = "sdpa"
    attn = LlamaAttention(cfg, layer_idx=0)
    rope = LlamaRotaryEmbedding(config=cfg)
    x = torch.randn(1, 6, 64)
    pos = rope(x, torch.arange(6)[None])
    mask0 = step0_mask(None, 6, x.device)
    ours = run_attention(attn, x, pos, TTTCache(), mask0)
    ref, _ = attn(x, position_embeddings=pos, attention_mask=None)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
