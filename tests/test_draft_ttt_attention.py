"""TTT attention against a naive reference that materialises each position's key sequence; the
SDPA path against the eager reference (outputs and gradients, with padding, through the trainer's
loss); no [T, T] tensor on the SDPA path."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modules.draft.eagle3_draft import Eagle3Draft
from modules.draft.eagle_draft import EagleDraft
from modules.draft.ttt_attention import (
    TTTCache, implementation, run_attention, step0_mask, ttt_scores_softmax_output, ttt_sdpa_output,
)
from modules.training.ttt_trainer import TTTCollator
from tests._helpers_eagle3 import AUX, VOCAB, tiny_eagle3, tiny_target
from tests.test_training_ttt_trainer import make_items, make_trainer

# fp32, SDPA vs the eager reference: both softmaxes run in fp32, so only summation order differs
TOL = dict(atol=2e-5, rtol=2e-5)


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
        ours = ttt_scores_softmax_output(q, keys[:k], values[:k], step0_mask(pad, T, q.device).dense, d ** -0.5)
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
    ours = run_attention(attn, x, pos, TTTCache(), mask0, implementation(cfg))
    ref, _ = attn(x, position_embeddings=pos, attention_mask=None)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager_outputs_and_gradients_with_padding():
    """Function level: every step count, real positions (padded queries are never used)."""
    torch.manual_seed(0)
    B, H, T, d, steps = 2, 3, 11, 16, 5
    lengths = [11, 7]
    pad = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    real = pad.bool()[:, None, :, None]                      # [B,1,T,1]
    leaves = [torch.randn(B, H, T, d, requires_grad=True) for _ in range(1 + 2 * steps)]
    q, keys, values = leaves[0], leaves[1:1 + steps], leaves[1 + steps:]
    w = torch.randn(B, H, T, d)                              # a loss that weighs every output
    mask = step0_mask(pad, T, q.device)
    for k in range(1, steps + 1):
        results = []
        for out in (ttt_scores_softmax_output(q, keys[:k], values[:k], mask.dense, d ** -0.5),
                    ttt_sdpa_output(q, keys[:k], values[:k], d ** -0.5)):
            grads = torch.autograd.grad((out * w * real).sum(), [q, *keys[:k], *values[:k]])
            results.append((out * real, grads))
        (eager, g_eager), (sdpa, g_sdpa) = results
        torch.testing.assert_close(sdpa, eager, **TOL)
        for a, b in zip(g_sdpa, g_eager):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("arch", ["eagle3", "eagle2"])
def test_ttt_loss_and_gradients_equal_with_eager_and_sdpa(tmp_path, arch):
    """The trainer's TTT loss (4 unrolled steps, right-padded batch of different lengths) and every
    parameter gradient: --attn eager vs sdpa. Covers Eagle3Draft.ttt_step and eagle2_ttt_step."""
    target = tiny_target()
    items = make_items(target, n=4)
    assert len({len(it["input_ids"]) for it in items}) > 1  # so the batch is padded
    batch = TTTCollator(64)(items)
    eagle3 = arch == "eagle3"
    results = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(1)  # the same initial draft for both
        if eagle3:
            draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 2), aux_layers=AUX)
        else:
            draft = EagleDraft.from_target(target, attn_implementation=impl)
        draft.config._attn_implementation = impl
        assert implementation(draft.config) == impl
        trainer = make_trainer(tmp_path / impl, draft, target, items, eagle3=eagle3)
        trainer.args.ttt_steps = 4
        loss, metrics = trainer.eagle_loss(draft, batch)
        loss.backward()
        results[impl] = loss, metrics, {n: p.grad for n, p in draft.named_parameters() if p.requires_grad}
    (loss_e, m_e, g_e), (loss_s, m_s, g_s) = results["eager"], results["sdpa"]
    torch.testing.assert_close(loss_s, loss_e, **TOL)
    assert m_s["s3_n"] == m_e["s3_n"] > 0 and m_s["s3_hit"] == m_e["s3_hit"]
    assert g_e.keys() == g_s.keys()
    for name in g_e:
        assert g_e[name] is not None and g_e[name].abs().sum() > 0, name
        torch.testing.assert_close(g_s[name], g_e[name], **TOL, msg=lambda m: f"{name}: {m}")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_sdpa_path_materialises_no_t_by_t_tensor():
    """Unrolled draft steps, forward and backward: every tensor of the SDPA path is smaller than one
    [T, T] matrix (the eager path's scores are [B, H, T, T]: the check can fail)."""
    draft = tiny_eagle3()
    T = 256
    ids = torch.randint(0, VOCAB, (1, T))
    fused = torch.randn(1, T, 192)
    sizes = {}
    for impl in ("eager", "sdpa"):
        draft.config._attn_implementation = impl
        with LargestTensor() as rec:
            cache, mask0, h = TTTCache(), step0_mask(torch.ones(1, T, dtype=torch.long), T, ids.device), fused
            for k in range(4):
                h = draft.ttt_step(ids, h, cache, mask0, step=k)
            draft.compute_logits(h).logsumexp(-1).sum().backward()
        sizes[impl] = rec.numel
    n_heads = draft.config.num_attention_heads
    assert sizes["eager"] >= n_heads * T * T
    assert sizes["sdpa"] < T * T, sizes  # not even one head's scores (nor a [T, T] bool mask)


def test_implementation_follows_the_config():
    cfg = tiny_eagle3().config
    assert implementation(cfg) == "sdpa"  # unset
    for name, expected in (("eager", "eager"), ("sdpa", "sdpa"), ("flash_attention_2", "sdpa")):
        cfg._attn_implementation = name
        assert implementation(cfg) == expected


def test_left_padding_is_refused():
    """The SDPA path relies on right padding (TTTCollator's); anything else is an error, not a silent
    difference."""
    step0_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), 4, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="right padding"):
        step0_mask(torch.tensor([[0, 1, 1, 1]]), 4, torch.device("cpu"))
