"""Training-time test (TTT) attention: the EAGLE-3 / HASS scheme, without copies of the sequence.

During TTT the draft is unrolled for n steps over the whole sequence at once. Step 0 reads the
target's real features; step k reads the draft's own step-(k-1) outputs. At position t, the
step-k query attends to
  - the step-0 keys of positions 0..t (causal; these come from real target features), and
  - the step-j keys AT POSITION t for j = 1..k (the draft's own earlier guesses there),
which is what the draft sees at inference after k speculative tokens. The keys/values of each
step are kept in lists (`TTTCache`); the extra keys are one per position, so their scores are a
row-wise dot product (an extra "diagonal"), never a [T, T] block per step and never n full
copies of the sequence.

`run_attention` applies this to any Llama-like attention module (q/k/v/o_proj, optional
q_norm/k_norm, GQA); both the EAGLE-3 midlayer and the EAGLE-1/2 draft's decoder layer use it.
"""
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class TTTCache:
    """Per-step key/value lists: keys[j] / values[j] are [B, n_kv_heads, T, d] of step j."""

    def __init__(self):
        self.keys, self.values = [], []

    def __len__(self):
        return len(self.keys)

    def append(self, k, v):
        self.keys.append(k)
        self.values.append(v)


def ttt_scores_softmax_output(q, keys, values, step0_mask, scaling):
    """Attention of step-k queries over [step-0 keys (masked), same-position keys of steps 1..k].

    q: [B, H, T, d]; keys/values: lists of [B, H, T, d] (already repeated for GQA), entry 0 from
    step 0. step0_mask: bool [B or 1, 1, T, T], True = may attend (causal and padding).
    Returns [B, H, T, d].
    """
    scores0 = torch.matmul(q, keys[0].transpose(-1, -2)) * scaling  # [B,H,T,T]
    scores0 = scores0.masked_fill(~step0_mask, torch.finfo(scores0.dtype).min)
    # One extra score per position for each later step: the "diagonal" terms.
    extra = [(q * k).sum(-1, keepdim=True) * scaling for k in keys[1:]]  # each [B,H,T,1]
    probs = torch.softmax(torch.cat([scores0] + extra, dim=-1).float(), dim=-1).to(q.dtype)
    T = q.shape[-2]
    out = torch.matmul(probs[..., :T], values[0])
    for j, v in enumerate(values[1:]):
        out = out + probs[..., T + j: T + j + 1] * v
    return out


def step0_mask(attention_mask, T, device):
    """bool [B|1, 1, T, T]: causal, and no attention to padded keys (attention_mask [B, T], 1 = real)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is None:
        return causal
    return causal & attention_mask.bool()[:, None, None, :]


def run_attention(attn, x, position_embeddings, cache: TTTCache, mask0):
    """One TTT step of a Llama-like attention module on input x [B, T, in]; appends this step's
    K/V to `cache` and returns the module's output [B, T, out] (after o_proj).

    Step 0 (empty cache) is plain causal attention over real features.
    """
    B, T, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, head_dim)
    k = attn.k_proj(x).view(B, T, -1, head_dim)
    v = attn.v_proj(x).view(B, T, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    n_rep = q.shape[1] // k.shape[1]
    cache.append(repeat_kv(k, n_rep), repeat_kv(v, n_rep))
    out = ttt_scores_softmax_output(q, cache.keys, cache.values, mask0, head_dim ** -0.5)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
