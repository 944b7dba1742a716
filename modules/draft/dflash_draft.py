"""The DFlash draft: a small stack of target-conditioned layers that fills a block of masked positions
in one forward (block diffusion drafting), in the layout vLLM 0.32 serves as `"method": "dflash"`.

    context (positions 0..n, the target's fused aux features a_p):
        c_p = hidden_norm(fc(a_p));  layer i:  K_i,p = k_norm(k_proj_i(c_p)) (RoPE at p),  V_i,p = v_proj_i(c_p)
    block (positions n+1..n+1+K):  tokens [x_{n+1}, mask, ..., mask] -> the target's (frozen) embeddings
        Qwen3-style pre-norm layers: h += attn(input_layernorm(h)), h += mlp(post_attention_layernorm(h)),
        q/k per-head RMSNorm; every block token attends to ALL context keys and ALL block keys (non-causal)
    mask slot j (position n+1+j) predicts x_{n+1+j}:  logits = lm_head(norm(h)) over the draft vocabulary.

Read from vLLM 0.32: model_executor/models/qwen3_dflash.py (DFlashQwen3Model: context K/V from
hidden_norm(fc(.)) through each layer's k/v projection and k_norm, precompute_and_store_context_kv;
layer structure; `dflash_config` mask_token_id; non-causal unless is_causal / dflash_config.causal),
v1/spec_decode/dflash.py + v1/spec_decode/utils.py copy_and_expand_dflash_inputs_kernel (queries
[next token, K mask tokens] at last context position + 1 + offset; the K mask slots are sampled).

Training (modules/training/ttt_trainer.py, through `block_unroll`): in the TTT slot convention slot t
reads token x_{t+1} and feature a_t, and "step k" predicts x_{t+2+k}. A DFlash block anchored at slot t
has context a_0..a_t, block [x_{t+1}, mask x K] at positions t+1.., and its mask slot k+1 predicts
x_{t+2+k}: the same targets, so the TTT trainer's loss (per-step decay, draft vocabulary, loss mask),
simulated tau, DDP and checkpoints apply unchanged. Every trained slot can anchor a block; training trains
`--block-anchors` sampled anchors per conversation (DFlashKind.anchored), evaluation every one.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from modules.draft.adapter import DraftAdapter
from modules.draft.eagle3_draft import Eagle3Draft, Eagle3MLP, check_fits_target
from modules.draft.kinds import DraftKind, ParallelOptions
from modules.settings import setting
from modules.draft.vocab import build_mappings
from modules.export import engines
from modules.io import cast_floats, save_draft_folder
from modules.kv_cache import TreeKVCache
from modules.target_weights import text_config

DFLASH_ARCHITECTURE = "DFlashDraftModel"  # vLLM 0.32 models/registry.py -> qwen3_dflash.DFlashQwen3ForCausalLM
WEIGHTS_NAME = "model.safetensors"


def make_dflash_config(target_config, draft_vocab_size, aux_layers, num_layers, block, mask_token_id,
                       target_model=None):
    """A Qwen3Config of `num_layers` layers shaped like the target, plus the fields vLLM's DFlash reads."""
    t = text_config(target_config)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    cfg = Qwen3Config(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=int(num_layers),
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads, head_dim=head_dim,
        hidden_act=getattr(t, "hidden_act", "silu"),
        max_position_embeddings=getattr(t, "max_position_embeddings", 4096),
        rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6), vocab_size=t.vocab_size,
        rope_parameters=dict(getattr(t, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}),
        tie_word_embeddings=False, bos_token_id=getattr(t, "bos_token_id", None),
        eos_token_id=getattr(t, "eos_token_id", None), pad_token_id=getattr(t, "pad_token_id", None))
    cfg.architectures = [DFLASH_ARCHITECTURE]
    cfg.draft_vocab_size = int(draft_vocab_size)
    cfg.target_hidden_size = t.hidden_size
    cfg.target_num_hidden_layers = t.num_hidden_layers
    cfg.eagle_aux_hidden_state_layer_ids = [int(i) for i in aux_layers]  # ours = vLLM's convention
    setattr(cfg, engines.PARALLEL_TOKENS_KEY, int(block))
    cfg.dflash_config = engines.dflash_config_fields(mask_token_id, aux_layers)
    if target_model is not None:
        cfg.target_model = str(target_model)
    return cfg


class DFlashAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)
        self.q_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)

    def keys_values(self, x, pos_emb):
        """(k [N, kv heads, T, d] normed + rotated, v [N, kv heads, T, d]) of x [N, T, h]."""
        N, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(N, T, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(N, T, -1, self.head_dim).transpose(1, 2)
        return apply_rotary_pos_emb(k, k, *pos_emb)[0], v

    def forward(self, x, pos_emb, context):
        """x [N, T, h]: N blocks of T tokens; context(q, k, v) -> attention output [N, H, T, d]."""
        N, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(N, T, -1, self.head_dim)).transpose(1, 2)
        k, v = self.keys_values(x, pos_emb)
        q = apply_rotary_pos_emb(q, q, *pos_emb)[0]
        return self.o_proj(context(q, k, v).transpose(1, 2).reshape(N, T, -1))


class DFlashLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)  # the same gated MLP (gate/up/down_proj) as the EAGLE-3 midlayer

    def forward(self, h, pos_emb, context):
        h = h + self.self_attn(self.input_layernorm(h), pos_emb, context)
        return h + self.mlp(self.post_attention_layernorm(h))


def block_attention(q, k, v, ctx_k, ctx_v, ctx_visible, scaling):
    """Every block query over [its context keys, all keys of its own block] (non-causal), one softmax.

    q, k, v: [N, H|Hkv, T, d] (N blocks of T tokens); ctx_k / ctx_v: [N|1, Hkv, C, d] context keys;
    ctx_visible: bool [N|1, C] (True = this block sees that context position) or None (all)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ctx_k, ctx_v = ctx_k.repeat_interleave(rep, 1), ctx_v.repeat_interleave(rep, 1)
    s_ctx = over_blocks(q, ctx_k.transpose(-1, -2)) * scaling              # [N, H, T, C]
    if ctx_visible is not None:
        s_ctx = s_ctx.masked_fill(~ctx_visible[:, None, None, :], torch.finfo(s_ctx.dtype).min)
    s_blk = torch.matmul(q, k.transpose(-1, -2)) * scaling                 # [N, H, T, T]
    p = torch.softmax(torch.cat([s_ctx, s_blk], -1).float(), -1).to(q.dtype)
    C = ctx_k.shape[2]
    return over_blocks(p[..., :C], ctx_v) + torch.matmul(p[..., C:], v)


def over_blocks(x, shared):
    """x [N, H, T, a] @ shared [N|1, H, a, b] -> [N, H, T, b]. A context shared by all N blocks ([1, ..]) is
    multiplied once with the N blocks' rows stacked ([H, N*T, a]), instead of being broadcast to N copies (in the
    backward too: training one conversation's anchors copied its context keys once per anchor)."""
    if shared.shape[0] != 1 or x.shape[0] == 1:
        return torch.matmul(x, shared)
    N, H, T, _ = x.shape
    out = torch.matmul(x.transpose(0, 1).reshape(H, N * T, -1), shared[0])  # [H, N*T, b]
    return out.view(H, N, T, -1).transpose(0, 1)


class DFlashDraft(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        h, n = config.hidden_size, config.draft_vocab_size
        th = getattr(config, "target_hidden_size", None) or h
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
        self.fc = nn.Linear(len(config.eagle_aux_hidden_state_layer_ids) * th, h, bias=False)
        self.hidden_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, n, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        d2t, t2d = build_mappings(torch.arange(n, device="cpu"), config.vocab_size)
        self.register_buffer("d2t", d2t)
        self.register_buffer("t2d", t2d)
        for m in [self.fc, self.layers, self.lm_head]:
            for sub in m.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=getattr(config, "initializer_range", 0.02))

    # the draft vocabulary and the target's weights: the same as EAGLE-3's (modules/draft/eagle3_draft.py)
    set_draft_vocab = Eagle3Draft.set_draft_vocab
    draft_ids = Eagle3Draft.draft_ids
    load_target_weights = Eagle3Draft.load_target_weights
    to_target_ids = Eagle3Draft.to_target_ids
    aux_layers = Eagle3Draft.aux_layers
    fused_size = property(lambda self: self.fc.in_features)

    @property
    def parallel_tokens(self) -> int:
        return int(getattr(self.config, engines.PARALLEL_TOKENS_KEY))

    @property
    def mask_token_id(self) -> int:
        return int(self.config.dflash_config["mask_token_id"])

    @classmethod
    def from_target(cls, target=None, draft_ids=None, aux_layers=None, num_layers=2, block=4, mask_token_id=None,
                    load_weights=True):
        from modules import target_weights
        from modules.draft.peagle_draft import default_mask_token

        config = target_weights.target_config(target)
        aux_layers = engines.default_aux_layers(config.num_hidden_layers) if aux_layers is None else aux_layers
        draft_ids = torch.arange(config.vocab_size) if draft_ids is None else draft_ids
        mask = default_mask_token(config) if mask_token_id is None else mask_token_id
        cfg = make_dflash_config(config, len(draft_ids), aux_layers, num_layers, block, mask,
                                 target_model=target_weights.target_name(target))
        draft = cls(cfg)
        draft.set_draft_vocab(draft_ids)
        if load_weights and not hasattr(target, "model_type"):
            draft.load_target_weights(*target_weights.load_embed_and_head(target))
        return draft

    # ---- forward --------------------------------------------------------------------------
    def context_states(self, fused):
        """c = hidden_norm(fc(fused features)) [.., T, h]: what every layer projects to context keys/values."""
        return self.hidden_norm(self.fc(fused.to(self.fc.weight.dtype)))

    def run_block(self, block_ids, positions, context_kv, ctx_visible):
        """The layers over N blocks (block_ids / positions [N, T]); context_kv(i) -> (keys, values) of layer i's
        context [N|1, Hkv, C, d]. Returns the pre-norm hidden states [N, T, h]."""
        h = self.embed_tokens(block_ids).to(self.fc.weight.dtype)
        pos_emb = self.rotary_emb(h, positions)
        scaling = self.config.head_dim ** -0.5
        for i, layer in enumerate(self.layers):
            ctx_k, ctx_v = context_kv(i)
            h = layer(h, pos_emb, lambda q, k, v: block_attention(q, k, v, ctx_k, ctx_v, ctx_visible, scaling))
        return h

    def block_unroll(self, slot_ids, features, slot_am, steps, select):
        """Training (modules/training/ttt_trainer.TTTUnroll): the outputs [N, h] at (step k, row b, slot t) of
        `select`, each from the block anchored at slot t (context a_0..a_t of row b, tokens [x_{t+1}, mask x
        steps] at positions t+1..) at mask slot k+1. One block per distinct anchor, all in one pass per row."""
        k_sel, b_sel, t_sel = select
        out = features.new_zeros(k_sel.shape[0], self.config.hidden_size, dtype=self.fc.weight.dtype)
        T = slot_ids.shape[1]
        offsets = torch.arange(steps + 1, device=slot_ids.device)
        for b in b_sel.unique().tolist():
            rows = b_sel == b
            anchors, which = t_sel[rows].unique(return_inverse=True)
            c = self.context_states(features[b:b + 1])                                   # [1, T, h]
            ctx_pos = torch.arange(T, device=c.device).unsqueeze(0)
            ctx_emb = self.rotary_emb(c, ctx_pos)
            kv = [layer.self_attn.keys_values(c, ctx_emb) for layer in self.layers]
            block_ids = torch.full((anchors.shape[0], steps + 1), self.mask_token_id, dtype=torch.long,
                                   device=slot_ids.device)
            block_ids[:, 0] = slot_ids[b, anchors]
            positions = anchors.unsqueeze(1) + 1 + offsets                                # [N, steps + 1]
            visible = torch.arange(T, device=c.device).unsqueeze(0) <= anchors.unsqueeze(1)  # [N, T]
            h = self.run_block(block_ids, positions, lambda i: kv[i], visible)
            out[rows] = h[which, k_sel[rows] + 1]
        return out

    def compute_logits(self, h):
        return self.lm_head(self.norm(h))

    # ---- save / load --------------------------------------------------------------------------
    def serving_tensors(self, with_embed=True):
        """{name: tensor} of the serving layout, not copied (as Eagle3Draft.serving_tensors)."""
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "rotary_emb."))}
        if with_embed:
            sd["embed_tokens.weight"] = self.embed_tokens.weight
        return sd

    serving_state_dict = Eagle3Draft.serving_state_dict

    def config_dict(self, dtype=None) -> dict:
        cfg = engines.clean_config(self.config.to_dict())
        cfg["architectures"] = [DFLASH_ARCHITECTURE]
        cfg.update(engines.rope_fields(cfg.get("rope_parameters")))
        cfg.update(engines.dtype_fields(dtype or self.fc.weight.dtype))
        cfg["target_model"] = engines.portable_name(cfg.get("target_model"))
        return cfg

    def save_pretrained(self, out_dir, with_embed=True, dtype=None):
        save_draft_folder(out_dir, cast_floats(self.serving_state_dict(with_embed), dtype), self.config_dict(dtype),
                          WEIGHTS_NAME)

    @staticmethod
    def config_from_dict(cfg_dict):
        """The Qwen3Config of a saved draft's config.json."""
        return Qwen3Config(**{k: v for k, v in cfg_dict.items()
                              if k not in ("dtype", "torch_dtype", "rope_theta", "rope_scaling")})

    @classmethod
    def from_pretrained(cls, draft_dir, target=None, dtype=torch.float32, **_):
        draft_dir = Path(draft_dir)
        cfg_dict = json.loads((draft_dir / "config.json").read_text())
        draft = cls(cls.config_from_dict(cfg_dict))
        sd = load_file(str(draft_dir / WEIGHTS_NAME))
        if "embed_tokens.weight" not in sd:
            from modules import target_weights
            sd["embed_tokens.weight"] = target_weights.load_embed_and_head(target or cfg_dict.get("target_model"))[0]
        missing, unexpected = draft.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("rotary_emb.")]
        if missing or unexpected:
            raise ValueError(f"{draft_dir / WEIGHTS_NAME}: missing keys {missing}, unexpected keys {unexpected}")
        return draft.to(dtype)


# ---- our decoder (modules/decode/parallel.py protocol) -------------------------------------------------

class DFlashAdapter(DraftAdapter):
    """DFlash in the parallel decoder: its cache holds each layer's context keys/values (one per accepted
    position, from the target's features); the block [root, mask x K] is never cached."""

    def __init__(self, draft):
        self.draft = draft
        self.aux_layers = draft.aux_layers
        self.block_size = draft.parallel_tokens

    def check_target(self, target):
        tcfg = target.config.get_text_config()
        if self.draft.fused_size != len(self.aux_layers) * tcfg.hidden_size or \
                self.draft.config.vocab_size != tcfg.vocab_size or max(self.aux_layers) > tcfg.num_hidden_layers:
            raise ValueError(f"DFlash draft does not fit the target (fc {self.draft.fused_size}, vocab "
                             f"{self.draft.config.vocab_size}, aux layers {self.aux_layers})")

    def target_features(self, last_hidden, hidden_states):
        return self.draft.context_states(torch.cat([hidden_states[i] for i in self.aux_layers], dim=-1))

    def new_cache(self, capacity):
        return TreeKVCache(self.draft.config.num_hidden_layers, capacity)

    def propose_block(self, ids, feats, start, cache, masks):
        """Context states feats [1, L, h] of positions start.. into the cache; the block [ids[-1], mask x K]
        at positions start+L.. Returns the K mask slots' hidden states [1, K, h]."""
        draft, L, K = self.draft, ids.shape[1], self.block_size
        ctx_emb = draft.rotary_emb(feats, torch.arange(start, start + L, device=feats.device).unsqueeze(0))
        kv = []
        for i, layer in enumerate(draft.layers):
            k, v = layer.self_attn.keys_values(feats, ctx_emb)
            kv.append(cache.layers[i].update(k, v))
        block_ids = torch.full((1, K + 1), draft.mask_token_id, dtype=torch.long, device=ids.device)
        block_ids[0, 0] = ids[0, -1]
        positions = torch.arange(start + L, start + L + K + 1, device=ids.device).unsqueeze(0)
        return draft.run_block(block_ids, positions, lambda i: kv[i], None)[:, 1:]

    def logprobs(self, hidden):
        return torch.log_softmax(self.draft.compute_logits(hidden).float(), dim=-1)

    def to_target_ids(self, draft_ids):
        return self.draft.to_target_ids(draft_ids)


# ---- the registry entry (modules/draft/kinds.py) -------------------------------------------------------

@dataclass
class DFlashOptions(ParallelOptions):
    """DFlash's build options: its block size and its depth."""
    draft_layers: int = setting(2, "dflash: decoder layers of the draft")


class DFlashKind(DraftKind):
    """DFlash: target-conditioned layers filling a block of K masked positions in one non-causal forward."""

    name = "dflash"
    draft_class = DFlashDraft
    fused_features = True
    own_vocab = True
    parallel = True
    loss_weights = {"w_reg": 0.0, "w_cls": 1.0, "noise_std": 0.0}
    export_files = ("config.json", "model.safetensors")
    vllm_method = "dflash"  # vLLM 0.32: config/speculative.py
    anchored = True  # block_unroll costs a block per anchor: training samples --block-anchors per conversation
    options = DFlashOptions

    def owns_config(self, config):
        return DFLASH_ARCHITECTURE in (config.get("architectures") or [])

    def build(self, target, draft_ids=None, aux_layers=None, weights=None, parallel_tokens=None, draft_layers=None,
              mask_token_id=None, **_):
        draft = self.draft_class.from_target(target, draft_ids=draft_ids, aux_layers=aux_layers,
                                             num_layers=draft_layers or 2, block=parallel_tokens or 4,
                                             mask_token_id=mask_token_id, load_weights=weights is None)
        if weights is not None:
            draft.load_target_weights(*weights)
        return draft

    def unroll_steps(self, draft, requested):
        return draft.parallel_tokens

    def tree_adapter(self, draft, vocab_ids=None):
        if vocab_ids is not None:
            raise ValueError("a DFlash draft proposes from its own draft vocabulary (d2t): no vocab_ids")
        return DFlashAdapter(draft)

    def save_trained(self, draft, out_dir, target):
        draft.save_pretrained(out_dir)
        return Path(out_dir)

    def export(self, draft, out_dir, target=None, dtype=torch.bfloat16):
        from modules.target_weights import target_config

        if not isinstance(draft, self.draft_class):
            draft = self.draft_class.from_pretrained(draft, target=target)
        tcfg = target_config(target or getattr(draft.config, "target_model", None))
        check_fits_target(draft, tcfg)
        engines.check_aux_layers(draft.aux_layers, tcfg.num_hidden_layers, "DFlash capture layers")
        save_draft_folder(out_dir, cast_floats(draft.serving_state_dict(True), dtype), draft.config_dict(dtype),
                          WEIGHTS_NAME)
        return Path(out_dir)


KIND = DFlashKind()
