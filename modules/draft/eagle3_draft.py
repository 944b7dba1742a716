"""The EAGLE-3 draft model.

    fused target features [B,T,3H] --fc (no bias)--> g [B,T,h]
    midlayer:  a = attn(cat(input_layernorm(embed(token t+1)), hidden_norm(g)))   (2h-wide q/k/v)
               x = g + a;  out = x + mlp(post_attention_layernorm(x))
    logits over the DRAFT vocabulary = lm_head(norm(out)),  target id = draft id + d2t[draft id]

`out` (before the final norm) is the draft's "hidden state": the next draft step feeds it back in
place of g (fc is applied to real fused features only). The token embedding is the target's,
frozen; lm_head starts as the target head's rows of the draft vocabulary and is trained.

Same calling convention as modules/draft/eagle_draft.EagleDraft, so the tree decoder can drive either:
`forward(input_ids, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
use_cache=False)` where hidden_states is either fused target features [B,T,3H] (fc applied) or
the draft's own previous output [B,T,h] (chosen by width, or forced with `fused=`).

Saved layout (SGLang `LlamaForCausalLMEagle3`, vLLM `Eagle3LlamaForCausalLM`, specforge):
config.json (LlamaConfig, architectures ["LlamaForCausalLMEagle3"], draft_vocab_size,
target_hidden_size, capture layer fields per engine: modules/export/engines.py) + model.safetensors with
fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t, t2d (+ embed_tokens.weight).

Export (export_eagle3, below): the training checkpoints already use that layout; exporting re-checks
the draft against the target (hidden size, vocabulary, aux layer ids, d2t/t2d consistency), casts the
weights (bf16 by default; d2t/t2d keep their int64/bool types), writes the capture layers in each
engine's convention (modules/export/engines.py) and a clean folder without trainer files.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb, repeat_kv,
)

from modules.export import engines

from modules.draft import ttt_attention
from modules.draft.adapter import DraftAdapter
from modules.draft.kinds import DraftKind
from modules.settings import setting
from modules.draft.vocab import build_mappings
from modules.io import cast_floats, save_draft_folder
from modules.kv_cache import TreeKVCache
from modules.target_weights import text_config

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_NAME = "model.safetensors"


def make_eagle3_config(target_config, draft_vocab_size, aux_layers, target_model=None,
                       intermediate_size=None):
    """A one-layer LlamaConfig shaped like the target, plus the EAGLE-3 fields serving engines read."""
    t = text_config(target_config)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    cfg = LlamaConfig(
        hidden_size=t.hidden_size,
        intermediate_size=intermediate_size or t.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
        head_dim=head_dim,
        hidden_act=getattr(t, "hidden_act", "silu"),
        max_position_embeddings=getattr(t, "max_position_embeddings", 4096),
        rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6),
        vocab_size=t.vocab_size,
        rope_parameters=dict(getattr(t, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}),
        tie_word_embeddings=False,
        bos_token_id=getattr(t, "bos_token_id", None),
        eos_token_id=getattr(t, "eos_token_id", None),
        pad_token_id=getattr(t, "pad_token_id", None),
    )
    cfg.architectures = [EAGLE3_ARCHITECTURE]
    cfg.draft_vocab_size = int(draft_vocab_size)
    cfg.target_hidden_size = t.hidden_size
    cfg.target_num_hidden_layers = t.num_hidden_layers
    # In memory and in checkpoints: our ids (HF hidden_states index, = vLLM's convention) in the
    # order the data fused them. Exports write each engine's convention (modules/export/engines.py).
    cfg.eagle_aux_hidden_state_layer_ids = [int(i) for i in aux_layers]
    cfg.eagle_version = 3
    if target_model is not None:
        cfg.target_model = str(target_model)
    return cfg


def _additive_or_bool_mask(attention_mask, B, T, past_len, device):
    """-> bool [B|1, 1, T, past+T] (True = attend) from None (causal), 2D padding or 4D as is."""
    if attention_mask is not None and attention_mask.ndim == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    kv = past_len + T
    causal = torch.ones(T, kv, dtype=torch.bool, device=device).tril(diagonal=past_len)[None, None]
    if attention_mask is None:
        return causal
    return causal & attention_mask.bool()[:, None, None, -kv:]


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read the 2h-wide cat(embedding, hidden)."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(2 * h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, position_embeddings, mask, past_key_values=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, 0)
        n_rep = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Eagle3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """The midlayer. `attend(x2)` runs attention on the normed 2h input; plain and TTT modes
    differ only in that callable."""

    def __init__(self, config):
        super().__init__()
        eps = config.rms_norm_eps
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.mlp = Eagle3MLP(config)
        # config norm_before_residual (speculators' default, read by its loader here): the attention's residual is
        # the normed hidden stream. Off (ours, SpecForge, the official code): the un-normed one.
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, embeds, hidden, attend):
        normed = self.hidden_norm(hidden)
        x2 = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        x = (normed if self.norm_before_residual else hidden) + attend(x2)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Draft(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        h, vocab, n = config.hidden_size, config.vocab_size, config.draft_vocab_size
        th = getattr(config, "target_hidden_size", None) or h
        self.embed_tokens = nn.Embedding(vocab, h)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
        # EAGLE-3.1 (config.norm_before_fc): an RMSNorm over the fused features before fc (vLLM: input_norm)
        self.input_norm = LlamaRMSNorm(3 * th, eps=config.rms_norm_eps) if getattr(config, "norm_before_fc",
                                                                                   False) else None
        self.fc = nn.Linear(3 * th, h, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, n, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        # Default mapping: the first n target ids (replaced by set_draft_vocab); built on the CPU even when the
        # draft is built on the meta device (export_tensors: its value-dependent checks need values).
        d2t, t2d = build_mappings(torch.arange(n, device="cpu"), vocab)
        self.register_buffer("d2t", d2t)
        self.register_buffer("t2d", t2d)
        std = getattr(config, "initializer_range", 0.02)
        for m in [self.fc, self.midlayer, self.lm_head]:
            for sub in m.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)

    # ---- construction -------------------------------------------------------------------
    @property
    def aux_layers(self):
        """Target hidden_states ids fused by fc, in fc's input order."""
        return list(self.config.eagle_aux_hidden_state_layer_ids)

    @property
    def fused_size(self):
        return self.fc.in_features

    @property
    def norm_output(self) -> bool:
        """EAGLE-3.1: the state fed to the next step is the normed output (vLLM's norm_output), not the raw one."""
        return bool(getattr(self.config, "norm_output", False))

    def project(self, fused):
        """Fused target features [.., 3H] -> the draft's input state [.., h]: fc, after input_norm in EAGLE-3.1."""
        fused = fused.to(self.fc.weight.dtype)
        return self.fc(self.input_norm(fused) if self.input_norm is not None else fused)

    def output_state(self, out):
        """The midlayer's output as the draft's hidden state (fed back, and the input of compute_logits)."""
        return self.norm(out) if self.norm_output else out

    @classmethod
    def from_target(cls, target=None, draft_ids=None, aux_layers=None, load_weights=True, eagle31_norms=False):
        """Fresh draft for a target (name/path, None = embedded default, loaded nn.Module, or a
        config: then embed/head stay random). draft_ids: sorted target ids of the draft vocab
        (None = the full vocabulary); aux_layers: None = the official default. eagle31_norms: EAGLE-3.1's
        norm before fc and normed state fed back (config norm_before_fc / norm_output, as vLLM reads them)."""
        from modules import target_weights

        config = target_weights.target_config(target)
        if aux_layers is None:
            aux_layers = engines.default_aux_layers(config.num_hidden_layers)
        if draft_ids is None:
            draft_ids = torch.arange(config.vocab_size)
        cfg = make_eagle3_config(config, len(draft_ids), aux_layers, target_model=target_weights.target_name(target))
        if eagle31_norms:
            cfg.norm_before_fc = cfg.norm_output = True
        draft = cls(cfg)
        draft.set_draft_vocab(draft_ids)
        if load_weights and not hasattr(target, "model_type"):
            embed, head = target_weights.load_embed_and_head(target)
            draft.load_target_weights(embed, head)
        return draft

    def set_draft_vocab(self, draft_ids):
        d2t, t2d = build_mappings(torch.as_tensor(draft_ids), self.config.vocab_size)
        if d2t.numel() != self.lm_head.out_features:
            raise ValueError(f"draft vocab has {d2t.numel()} ids, lm_head has {self.lm_head.out_features} rows")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @property
    def draft_ids(self):
        """Target ids of the draft vocabulary, in draft-id order."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def load_target_weights(self, embed, head):
        """Frozen embedding from the target; lm_head initialised from the target head's rows."""
        with torch.no_grad():
            if tuple(embed.shape) != tuple(self.embed_tokens.weight.shape):
                raise ValueError(f"target embedding {tuple(embed.shape)} does not fit the draft "
                                 f"{tuple(self.embed_tokens.weight.shape)}")
            self.embed_tokens.weight.copy_(embed)
            self.lm_head.weight.copy_(head[self.draft_ids.to(head.device)])

    # ---- forward ------------------------------------------------------------------------
    def _is_fused(self, hidden_states, fused):
        if fused is not None:
            return fused
        return hidden_states.shape[-1] == self.fused_size and self.fused_size != self.config.hidden_size

    def forward(self, input_ids, hidden_states, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, fused=None):
        """input_ids [B,T] (token t+1 at position t); hidden_states fused [B,T,3H] or own [B,T,h].
        attention_mask: None (causal), 2D padding [B, past+T], or 4D bool [B,1,T,past+T] (True = attend).
        Returns out [B,T,h] (pre-norm, normed in EAGLE-3.1; feed back or pass to compute_logits), or (out, cache)."""
        g = self.project(hidden_states) if self._is_fused(hidden_states, fused) else hidden_states
        embeds = self.embed_tokens(input_ids).to(g.dtype)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=g.device).unsqueeze(0).expand(B, -1)
        mask = _additive_or_bool_mask(attention_mask, B, T, past_len, g.device)
        pos_emb = self.rotary_emb(g, position_ids)
        attn = self.midlayer.self_attn
        out = self.output_state(self.midlayer(embeds, g, lambda x2: attn(x2, pos_emb, mask, past_key_values)))
        return (out, past_key_values) if use_cache else out

    def ttt_step(self, input_ids, hidden_states, cache, mask0, step):
        """One training-time-test step over the whole sequence (see modules/draft/ttt_attention.py):
        step 0 takes fused features, step k the step-(k-1) output; positions shift by k."""
        g = self.project(hidden_states) if step == 0 else hidden_states
        embeds = self.embed_tokens(input_ids).to(g.dtype)
        B, T = input_ids.shape
        position_ids = torch.arange(step, step + T, device=g.device).unsqueeze(0)
        pos_emb = self.rotary_emb(g, position_ids)
        attn, impl = self.midlayer.self_attn, ttt_attention.implementation(self.config)
        return self.output_state(
            self.midlayer(embeds, g, lambda x2: ttt_attention.run_attention(attn, x2, pos_emb, cache, mask0, impl)))

    def compute_logits(self, h):
        """Logits over the DRAFT vocabulary [.., draft_vocab_size]: lm_head(norm(out)) either way (an EAGLE-3.1
        state is normed already)."""
        return self.lm_head(h if self.norm_output else self.norm(h))

    def to_target_ids(self, draft_token):
        return draft_token + self.d2t[draft_token]

    # ---- save / load --------------------------------------------------------------------
    def serving_tensors(self, with_embed=True):
        """{name: tensor} of the serving layout, not copied (on the meta device: the names and shapes an export
        must hold, modules/draft/export_check.py)."""
        sd = {k: v for k, v in self.state_dict().items()
              if k.startswith(("fc.", "midlayer.", "norm.", "lm_head.", "input_norm.")) or k in ("d2t", "t2d")}
        if with_embed:
            sd["embed_tokens.weight"] = self.embed_tokens.weight
        return sd

    def serving_state_dict(self, with_embed=True):
        return {k: v.detach().contiguous().cpu() for k, v in self.serving_tensors(with_embed).items()}

    def save_pretrained(self, out_dir, with_embed=True, dtype=None):
        """config.json + model.safetensors in the SGLang EAGLE-3 layout, written atomically."""
        sd = self.serving_state_dict(with_embed=with_embed)
        save_draft_folder(out_dir, cast_floats(sd, dtype), self.config_dict(dtype), WEIGHTS_NAME)

    def config_dict(self, dtype=None) -> dict:
        """config.json of a checkpoint: our capture ids (exports rewrite them per engine), RoPE fields
        old loaders read, both dtype keys, no machine paths."""
        cfg = engines.clean_config(self.config.to_dict())
        cfg["architectures"] = [EAGLE3_ARCHITECTURE]
        cfg.pop("eagle_config", None)
        cfg.update(engines.rope_fields(cfg.get("rope_parameters")))
        cfg.update(engines.dtype_fields(dtype or self.fc.weight.dtype))
        return cfg

    @classmethod
    def from_pretrained(cls, draft_dir, target=None, dtype=torch.float32, **_):
        """Load a saved EAGLE-3 draft. The embedding comes from the file when saved, otherwise
        from `target` (name/path/module; None = the config's target_model)."""
        draft_dir = Path(draft_dir)
        draft = cls(cls.config_from_dict(json.loads((draft_dir / "config.json").read_text()), target,
                                         draft_dir / "config.json"))
        sd = load_file(str(draft_dir / WEIGHTS_NAME))
        if "embed_tokens.weight" not in sd:
            from modules import target_weights
            embed, _ = target_weights.load_embed_and_head(target or getattr(draft.config, "target_model", None))
            sd["embed_tokens.weight"] = embed
        missing, unexpected = draft.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{draft_dir / WEIGHTS_NAME}: missing keys {missing}, unexpected keys {unexpected}")
        return draft.to(dtype)

    @staticmethod
    def config_from_dict(cfg_dict, target=None, where="config.json"):
        """The LlamaConfig of a saved draft's config.json (ours, an export's or SpecForge's): capture layers
        read in our convention (modules/export/engines.py); `target` is asked only when the file does not say
        how many layers it has."""
        cfg_dict = dict(cfg_dict)
        if "draft_vocab_size" not in cfg_dict:
            raise ValueError(f"{where}: no 'draft_vocab_size': not an EAGLE-3 draft config")
        for key in ("dtype", "torch_dtype", "rope_theta", "rope_scaling"):  # rope_parameters holds the rope
            cfg_dict.pop(key, None)
        if target is None:
            target = cfg_dict.get("target_model")
        n = cfg_dict.get("target_num_hidden_layers")
        if n is None and cfg_dict.get("eagle_version") == 3 and engines.AUX_KEY not in cfg_dict:
            # our checkpoints before the engine conventions: eagle_config held OUR ids
            cfg_dict[engines.AUX_KEY] = (cfg_dict.get("eagle_config") or {}).get(engines.AUX_KEY)
        if n is None:  # a draft written elsewhere (SpecForge): the target says how many layers it has
            from modules import target_weights
            n = cfg_dict["target_num_hidden_layers"] = target_weights.target_config(target).num_hidden_layers
        cfg_dict[engines.AUX_KEY] = engines.read_aux_layers(cfg_dict, n)
        eagle_config = cfg_dict.pop("eagle_config", None) or {}
        if "norm_before_fc" in eagle_config:  # vLLM reads it there first (speculators writes it there)
            cfg_dict["norm_before_fc"] = eagle_config["norm_before_fc"]
        return LlamaConfig(**cfg_dict)


# ---- tree decoding (modules/decode/tree_decoding.py protocol) ---------------------------------------

class Eagle3Adapter(DraftAdapter):
    """EAGLE-3 in the tree decoder: features = fc(cat of the aux-layer hidden states), the
    draft's own norm + lm_head over the draft vocab, draft ids mapped back through d2t."""

    def __init__(self, draft):
        self.draft = draft
        self.aux_layers = draft.aux_layers

    def check_target(self, target):
        tcfg = target.config.get_text_config()
        problems = []
        if self.draft.fused_size != 3 * tcfg.hidden_size:
            problems.append(f"fc takes {self.draft.fused_size} features, target gives 3 x {tcfg.hidden_size}")
        if self.draft.config.vocab_size != tcfg.vocab_size:
            problems.append(f"vocab {self.draft.config.vocab_size} vs target {tcfg.vocab_size}")
        if max(self.aux_layers) > tcfg.num_hidden_layers:  # hidden_states has layers + 1 entries
            problems.append(f"aux layers {self.aux_layers} beyond the target's {tcfg.num_hidden_layers} layers")
        if problems:
            raise ValueError("EAGLE-3 draft does not fit the target: " + "; ".join(problems))

    def target_features(self, last_hidden, hidden_states):
        fused = torch.cat([hidden_states[i] for i in self.aux_layers], dim=-1)
        return self.draft.project(fused)

    def new_cache(self, capacity):
        return TreeKVCache(1, capacity)

    def forward(self, input_ids, features, position_ids, attention_mask, cache):
        out, _ = self.draft(input_ids, features, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True, fused=False)
        return out

    def logprobs(self, hidden):
        return torch.log_softmax(self.draft.compute_logits(hidden).float(), dim=-1)

    def to_target_ids(self, draft_ids):
        return self.draft.to_target_ids(draft_ids)


# ---- export for the engines (the rules: modules/export/engines.py) ------------------------------

class Eagle3ExportError(ValueError):
    """A draft that does not fit its target or is internally inconsistent (one-line message)."""


def check_fits_target(draft, target_config, where="draft"):
    t = text_config(target_config)
    problems = []
    if draft.fused_size != 3 * t.hidden_size:
        problems.append(f"fc takes {draft.fused_size} features, the target gives 3 x {t.hidden_size}")
    if draft.config.vocab_size != t.vocab_size:
        problems.append(f"vocab {draft.config.vocab_size} vs target {t.vocab_size}")
    if any(not 0 <= i <= t.num_hidden_layers for i in draft.aux_layers):
        problems.append(f"aux layer ids {draft.aux_layers} outside 0..{t.num_hidden_layers}")
    ids = draft.draft_ids
    if int(ids.max()) >= t.vocab_size or int(ids.min()) < 0:
        problems.append("d2t maps outside the target vocabulary")
    elif not torch.equal(draft.t2d.nonzero().flatten().to(ids.device), ids):
        problems.append("t2d does not mark exactly the d2t targets")
    if problems:
        raise Eagle3ExportError(f"{where}: " + "; ".join(problems))


def engine_layout(draft, num_target_layers, where="draft"):
    """(state dict, config) in the engines' layout: capture ids sorted (fc's input blocks permuted to
    match, since engines hand over the layers in layer order), validated, and written in each
    engine's convention (modules/export/engines.py)."""
    ids = draft.aux_layers
    try:
        sorted_ids = engines.check_aux_layers(ids, num_target_layers, f"{where}: capture layers")
    except engines.EngineConventionError as err:
        raise Eagle3ExportError(str(err)) from err
    sd = draft.serving_state_dict(with_embed=True)
    if sorted_ids != ids:  # fc's input blocks (and EAGLE-3.1's input_norm weight over them) in layer order
        h = draft.fused_size // len(ids)
        blocks = sd["fc.weight"].split(h, dim=1)
        sd["fc.weight"] = torch.cat([blocks[ids.index(i)] for i in sorted_ids], dim=1)
        if "input_norm.weight" in sd:
            blocks = sd["input_norm.weight"].split(h)
            sd["input_norm.weight"] = torch.cat([blocks[ids.index(i)] for i in sorted_ids])
    cfg = draft.config_dict()
    cfg.pop(engines.AUX_KEY, None)
    cfg.update(engines.aux_layer_fields(sorted_ids, num_target_layers))
    cfg["target_model"] = engines.portable_name(cfg.get("target_model"))
    return sd, cfg


def export_eagle3(draft, out_dir, target=None, dtype=torch.bfloat16):
    """draft: an Eagle3Draft or a folder holding one. target: name/path/module (None = the config's
    target_model). dtype: bf16 by default (None keeps the training dtype). Returns the output folder."""
    from modules.target_weights import target_config

    where = "draft"
    if not isinstance(draft, Eagle3Draft):
        where = Path(draft)
        if not (where / "config.json").is_file() or not (where / "model.safetensors").is_file():
            raise Eagle3ExportError(f"{where}: no config.json / model.safetensors (not a draft folder)")
        try:
            draft = Eagle3Draft.from_pretrained(where, target=target)
        except (ValueError, RuntimeError) as err:
            raise Eagle3ExportError(str(err).splitlines()[0]) from err
    if target is None:
        target = getattr(draft.config, "target_model", None)
    tcfg = target_config(target)
    check_fits_target(draft, tcfg, where)
    sd, cfg = engine_layout(draft, tcfg.num_hidden_layers, where)
    dtype = dtype or draft.fc.weight.dtype
    cfg.update(engines.dtype_fields(dtype))
    save_draft_folder(out_dir, cast_floats(sd, dtype), cfg, "model.safetensors")
    return Path(out_dir)


# ---- the registry entry (modules/draft/kinds.py) --------------------------------------------

@dataclass
class Eagle3Options:
    """EAGLE-3's own build options (flags of train/train_eagle_ttt.py; DraftKind.options)."""
    eagle31_norms: bool = setting(False, "eagle3, peagle: EAGLE-3.1's norms, an RMSNorm before fc and the normed state "
                                         "fed to the next step (config norm_before_fc / norm_output; vLLM 0.32 serves "
                                         "them)", action="store_true")


class Eagle3Kind(DraftKind):
    """EAGLE-3: fused low/mid/high target features in, its own head over a draft vocabulary out."""

    name = "eagle3"
    draft_class = Eagle3Draft
    fused_features = True
    own_vocab = True
    loss_weights = {"w_reg": 0.0, "w_cls": 1.0, "noise_std": 0.0}
    export_files = ("config.json", "model.safetensors")
    vllm_method = "eagle3"  # vLLM 0.32: config/speculative.py
    options = Eagle3Options

    def owns_config(self, config):
        return config.get("eagle_version") == 3 or any("Eagle3" in a for a in config.get("architectures") or [])

    def build(self, target, draft_ids=None, aux_layers=None, weights=None, eagle31_norms=False, **_):
        draft = self.draft_class.from_target(target, draft_ids=draft_ids, aux_layers=aux_layers,
                                             load_weights=weights is None, eagle31_norms=eagle31_norms)
        if weights is not None:
            draft.load_target_weights(*weights)
        return draft

    def tree_adapter(self, draft, vocab_ids=None):
        if vocab_ids is not None:
            raise ValueError("an EAGLE-3 draft proposes from its own draft vocabulary (d2t): no vocab_ids")
        return Eagle3Adapter(draft)

    def save_trained(self, draft, out_dir, target):
        draft.save_pretrained(out_dir)  # the checkpoint layout, already the SGLang EAGLE-3 one
        return Path(out_dir)

    def export(self, draft, out_dir, target=None, dtype=torch.bfloat16):
        return export_eagle3(draft, out_dir, target=target, dtype=dtype)


KIND = Eagle3Kind()
