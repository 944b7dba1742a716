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

Two implementations of the same math, chosen by the draft config's attention implementation
(`--attn`; `implementation`):
  - eager (`ttt_scores_softmax_output`): the reference. It materialises the [B, H, T, T] step-0
    scores with an fp32 softmax and autograd keeps the probabilities of every step: at Llama-3.1-8B
    draft shapes, T=2048, 7 steps, fp32, the attention alone peaks at 5.3 GB against 1.3 GB for
    sdpa (benchmark/bench_ttt_attention.py --attention-only; benchmark/README.md).
  - sdpa, the default (`ttt_sdpa_output`): one torch.nn.functional.scaled_dot_product_attention call
    per step with plain causal masking, so flash / memory-efficient kernels (GPU) and the CPU flash
    kernel run it in blocks and no [T, T] matrix exists. The diagonal keys enter the same softmax as
    extra "sink" keys (see the function), so both parts are combined exactly.

`run_attention` applies this to any Llama-like attention module (q/k/v/o_proj, optional
q_norm/k_norm, GQA); both the EAGLE-3 midlayer and the EAGLE-1/2 draft's decoder layer use it.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class TTTCache:
    """Per-step key/value lists: keys[j] / values[j] are [B, n_heads, T, d] of step j (repeated for GQA)."""

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


def ttt_sdpa_output(q, keys, values, scaling):
    """ttt_scores_softmax_output's result through one scaled_dot_product_attention call, causal only.

    The n = len(keys) - 1 diagonal keys differ per query, so they cannot be ordinary key columns.
    They become n "sink" keys shared by all queries, in n extra head dimensions:
      query t:   [q_t, q_t.K_1[t], ..., q_t.K_n[t], 0...]
      sink j:    key = value = unit vector at dimension d + j  -> score scaling * q_t.K_j[t], the
                 diagonal score itself, and output dimension d + j = its softmax probability p_j
      prefix s:  [K_0[s], 0...], value [V_0[s], 0...]
    Output[:d] is then the prefix part over the full softmax denominator, and the diagonal values
    are added as sum_j p_j V_j[t]: exactly the reference. The sinks are put first and n zero dummy
    queries in front, so that plain causal masking of the (n + T)-square lets query t see the n
    sinks and prefix keys 0..t. Padded keys are not masked: with right padding (TTTCollator) a real
    query never sees one under causality, and padded queries' outputs reach no real position
    (their later steps read only their own position).
    q: [B, H, T, d]; keys/values: lists of [B, H, T, d], entry 0 from step 0. Returns [B, H, T, d].
    """
    n = len(keys) - 1
    if n == 0:
        return F.scaled_dot_product_attention(q, keys[0], values[0], is_causal=True, scale=scaling)
    B, H, T, d = q.shape
    width = -(-(d + n) // 8) * 8  # kernels want head dims in multiples of 8
    dots = torch.cat([(q * k).sum(-1, keepdim=True) for k in keys[1:]], dim=-1)    # [B,H,T,n]
    q_ = F.pad(torch.cat([q, dots], dim=-1), (0, width - d - n, n, 0))              # [B,H,n+T,width]
    sinks = torch.zeros(n, width, dtype=q.dtype, device=q.device)
    j = torch.arange(n, device=q.device)  # on q's device: CPU indices into a GPU tensor are a copy each call
    sinks[j, d + j] = 1
    sinks = sinks.expand(B, H, n, width)
    k_ = torch.cat([sinks, F.pad(keys[0], (0, width - d))], dim=2)                  # [B,H,n+T,width]
    v_ = torch.cat([sinks, F.pad(values[0], (0, width - d))], dim=2)
    o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scaling)[:, :, n:]
    out = o[..., :d]
    for j, v in enumerate(values[1:]):
        out = out + o[..., d + j: d + j + 1] * v
    return out


@dataclass
class Step0Mask:
    """Which step-0 keys a query may see: causal, and no padded key (attention_mask [B, T], 1 = real,
    None = no padding). Padding must be at the right end (as TTTCollator pads); the SDPA path then
    needs no mask tensor at all (ttt_sdpa_output), only the eager reference builds `dense`."""
    attention_mask: torch.Tensor | None
    T: int
    device: torch.device

    def __post_init__(self):
        if self.attention_mask is not None:  # right padding: each row is 1...1 0...0 (no host sync)
            am = self.attention_mask.bool()
            torch._assert_async((am[:, 1:] <= am[:, :-1]).all(), "TTT attention needs right padding")

    @functools.cached_property
    def dense(self):
        """bool [B|1, 1, T, T], True = may attend."""
        causal = torch.ones(self.T, self.T, dtype=torch.bool, device=self.device).tril()[None, None]
        if self.attention_mask is None:
            return causal
        return causal & self.attention_mask.bool()[:, None, None, :]


def step0_mask(attention_mask, T, device):
    """The step-0 mask of a TTT unroll (Step0Mask; built once, passed to every step)."""
    return Step0Mask(attention_mask, T, device)


def implementation(config):
    """'eager' (the reference) when the draft config asks for eager attention (--attn eager), else
    'sdpa' (sdpa, flash_attention_2, unset): TTT attention goes through torch's SDPA kernels."""
    return "eager" if getattr(config, "_attn_implementation", None) == "eager" else "sdpa"


def run_attention(attn, x, position_embeddings, cache: TTTCache, mask0: Step0Mask, impl):
    """One TTT step of a Llama-like attention module on input x [B, T, in]; appends this step's
    K/V to `cache` and returns the module's output [B, T, out] (after o_proj).

    Step 0 (empty cache) is plain causal attention over real features. impl: 'eager' or 'sdpa'
    (`implementation(config)`).
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
    if impl == "eager":
        out = ttt_scores_softmax_output(q, cache.keys, cache.values, mask0.dense, head_dim ** -0.5)
    else:
        out = ttt_sdpa_output(q, cache.keys, cache.values, head_dim ** -0.5)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
