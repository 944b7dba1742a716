"""The EAGLE-1/2 draft model: fc(cat(token embedding, target feature)) -> one decoder layer.

Input at position t is the target's feature f_t (post-final-norm hidden state) and the
embedding of token t+1; the output is the predicted feature f_{t+1}, which the target's frozen
lm_head turns into logits for token t+2.

The decoder layer is the TARGET family's own class (LlamaDecoderLayer, Qwen2DecoderLayer,
MistralDecoderLayer, ...) so that attention goes through transformers' attention interface
(sdpa / eager / flash_attention_2) and the weights have the names serving engines expect.
Its input_layernorm is replaced by Identity (the fc output is not normalised, as in the
official EAGLE-1 code), and there is no final norm.

Saved layout (SGLang `LlamaForCausalLMEagle`, vLLM `EagleLlamaForCausalLM`):
config.json + model.safetensors with keys fc.*, layers.0.*, embed_tokens.weight.
The lm_head is never saved: `from_pretrained(dir, target=...)` re-attaches it from the target.

Export (export_draft, below; the engine rules: modules/export/engines.py): one output folder serves
SGLang, vLLM and the official EAGLE code:
  config.json          the target family's config with one layer; architectures
                       ["LlamaForCausalLMEagle", "LlamaForCausalLM"] (SGLang takes the first, vLLM
                       the second as EagleLlamaForCausalLM); rope_theta / rope_scaling beside
                       rope_parameters; dtype and torch_dtype; no "bias" key, no machine paths
  model.safetensors    SGLang / vLLM: fc.weight, fc.bias (zeros unless trained with one), layers.0.*,
                       embed_tokens.weight
  pytorch_model.bin    official `eagle-llm` EaModel (loads only this name, strict, needs embed_tokens)
Weights are bf16 by default. Before writing, the keys and shapes are checked against the target's
config: a draft for another target (hidden size, vocab, heads, intermediate size) is refused with
the differences listed; so is a family no engine has an EAGLE-1/2 class for.
"""
import copy
import importlib
import json
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from modules.export import engines

from modules.draft import ttt_attention
from modules.draft.adapter import DraftAdapter
from modules.draft.kinds import DraftKind
from modules.io import atomic_write, save_draft_folder
from modules.target_weights import text_config

EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle"  # checkpoints of families no engine serves (see engines.py)
WEIGHTS_NAME = "model.safetensors"


def family_classes(config):
    """(DecoderLayer class, RotaryEmbedding class) of the target's model family.

    Found through the Auto mapping (config class -> e.g. Qwen2Model) and its modeling module,
    so any Llama-like family works without a hand-written table.
    """
    try:
        base_cls = MODEL_MAPPING[type(config)]
    except KeyError as e:
        raise ValueError(f"no transformers model class for model_type '{config.model_type}'") from e
    module = importlib.import_module(base_cls.__module__)
    prefix = base_cls.__name__[: -len("Model")]
    layer_cls = getattr(module, f"{prefix}DecoderLayer", None)
    rotary_cls = getattr(module, f"{prefix}RotaryEmbedding", None)
    if layer_cls is None or rotary_cls is None:
        raise ValueError(
            f"model_type '{config.model_type}' is not Llama-like: {module.__name__} has no "
            f"{prefix}DecoderLayer / {prefix}RotaryEmbedding"
        )
    return layer_cls, rotary_cls


def make_draft_config(target_config, bias=False, target_model=None, attn_implementation="sdpa"):
    """Draft config = copy of the target's text config with one layer plus EAGLE fields."""
    cfg = copy.deepcopy(text_config(target_config))
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        # Families with per-layer attention types (Qwen2, ...): the draft layer is full attention.
        cfg.layer_types = ["full_attention"]
    if hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = False
    cfg.architectures = checkpoint_architectures(cfg.model_type)
    # Not "bias": SGLang reads that key as attention bias (modules/export/engines.py).
    cfg.fc_bias = bool(bias)
    cfg.eagle_version = 2
    if target_model is not None:
        cfg.target_model = str(target_model)
    cfg._attn_implementation = attn_implementation
    return cfg


def checkpoint_architectures(model_type: str) -> list[str]:
    """The engines' names for families they serve; other families still train and decode here
    (export refuses them with the reason, export_draft below)."""
    if model_type in engines.EAGLE_ARCHITECTURES:
        return engines.eagle_architectures(model_type)[0]
    return [EAGLE_ARCHITECTURE]


def fc_bias(config) -> bool:
    """Whether the draft's fc has a bias: `fc_bias`, or the pre-rename `bias` key of older checkpoints."""
    return bool(getattr(config, "fc_bias", getattr(config, "bias", False)))


def draft_config_dict(cfg: dict, dtype: torch.dtype) -> dict:
    """The config.json of a saved or exported EAGLE-1/2 draft, in the layout every engine reads
    (modules/export/engines.py): architectures per family, one layer, RoPE fields old loaders read, both dtype
    keys, no "bias" key and no machine paths."""
    cfg = engines.clean_config(cfg)
    cfg["fc_bias"] = bool(cfg.pop("bias", cfg.get("fc_bias", False)))
    cfg["architectures"] = checkpoint_architectures(cfg["model_type"])
    cfg["num_hidden_layers"] = 1
    cfg.update(engines.rope_fields(cfg.get("rope_parameters")))
    cfg.update(engines.dtype_fields(dtype))
    return cfg


def _to_attention_format(mask4d, attn_implementation, dtype):
    """A ready 4D mask [B,1,Q,K] goes to the layer as the implementation expects it.

    sdpa takes bool (True = attend) as is; eager adds the mask to the scores, so a bool mask
    becomes 0 / dtype-min. Float masks are assumed additive already.
    """
    if mask4d.dtype == torch.bool and attn_implementation != "sdpa":
        return torch.zeros(mask4d.shape, dtype=dtype, device=mask4d.device).masked_fill(
            ~mask4d, torch.finfo(dtype).min
        )
    return mask4d


class EagleDraft(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        h, vocab = config.hidden_size, config.vocab_size
        layer_cls, rotary_cls = family_classes(config)
        # Frozen parts: filled from the target's weights (modules/target_weights.py).
        self.embed_tokens = nn.Embedding(vocab, h)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)
        # Trained parts.
        self.fc = nn.Linear(2 * h, h, bias=fc_bias(config))
        layer = layer_cls(config, layer_idx=0)
        layer.input_layernorm = nn.Identity()  # official EAGLE: no norm on the fc output
        self.layers = nn.ModuleList([layer])
        self.rotary_emb = rotary_cls(config=config)
        self._init_trainable(getattr(config, "initializer_range", 0.02))

    # ---- construction -------------------------------------------------------------------
    def _init_trainable(self, std):
        for module in [self.fc, self.layers]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    @classmethod
    def from_target(cls, target=None, bias=False, attn_implementation="sdpa", load_head=True):
        """Fresh draft for a target: a model name/path (None = embedded default), a loaded
        nn.Module, or a config (then embed/head stay random unless load_head finds weights)."""
        from modules import target_weights

        config = target_weights.target_config(target)
        name = target_weights.target_name(target)
        draft = cls(make_draft_config(config, bias=bias, target_model=name, attn_implementation=attn_implementation))
        if load_head and not hasattr(target, "model_type"):
            draft.load_frozen(*target_weights.load_embed_and_head(target))
        return draft

    def load_frozen(self, embed, head):
        """Attach frozen embedding / lm_head weights ([V, H] each; the same tensor when tied)."""
        v, h = self.embed_tokens.weight.shape
        for name, w in (("embed_tokens", embed), ("lm_head", head)):
            if tuple(w.shape) != (v, h):
                raise ValueError(f"target {name} has shape {tuple(w.shape)}, draft expects {(v, h)}")
        dtype = self.fc.weight.dtype
        self.embed_tokens.weight = nn.Parameter(embed.to(dtype).clone(), requires_grad=False)
        if head is embed:  # tied (SmolLM2): share one tensor, no second copy in memory
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight = nn.Parameter(head.to(dtype).clone(), requires_grad=False)

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16) would also round RoPE's inv_freq buffer; keep it float32 as computed.
        super()._apply(fn, *args, **kwargs)
        inv = self.rotary_emb.inv_freq
        if inv.dtype != torch.float32:
            fresh = type(self.rotary_emb)(config=self.config)
            self.rotary_emb = fresh.to(inv.device)
        return self

    # ---- forward ------------------------------------------------------------------------
    def forward(self, input_ids, hidden_states, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False):
        """input_ids [B,T] (token t+1 at position t), hidden_states [B,T,H] (feature f_t).

        attention_mask: None (causal), 2D padding mask [B, T_past+T], or a ready 4D mask
        [B,1,T,T_past+T] (bool True = attend, or additive float) used unchanged.
        past_key_values: a transformers DynamicCache, updated in place.
        Returns out_hidden [B,T,H]; with use_cache=True returns (out_hidden, cache), creating a
        DynamicCache when none was given.
        """
        if not torch.is_autocast_enabled(hidden_states.device.type):
            hidden_states = hidden_states.to(self.fc.weight.dtype)  # e.g. bf16 target features, fp32 draft
        inputs_embeds = self.embed_tokens(input_ids).to(hidden_states.dtype)
        x = self.fc(torch.cat((inputs_embeds, hidden_states), dim=-1))
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        bsz, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device).unsqueeze(0).expand(bsz, -1)
        impl = self.config._attn_implementation
        if attention_mask is not None and attention_mask.ndim == 4:
            mask = _to_attention_format(attention_mask, impl, x.dtype)
        else:
            # no position_ids: they only serve HF's packed-sequence detection (a host sync per
            # call), and a draft's batch is never packed
            mask = create_causal_mask(
                config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                past_key_values=past_key_values, position_ids=None,
            )
        position_embeddings = self.rotary_emb(x, position_ids)
        out = self.layers[0](
            x, attention_mask=mask, position_ids=position_ids, past_key_values=past_key_values,
            use_cache=past_key_values is not None, position_embeddings=position_embeddings,
        )
        if isinstance(out, tuple):  # older layer classes return tuples
            out = out[0]
        return (out, past_key_values) if use_cache else out

    def ttt_step(self, input_ids, hidden_states, cache, mask0, step):
        """One training-time-test step (modules/draft/ttt_attention.py): fc(cat(embed, feature)) then the decoder
        layer with TTT attention (input_layernorm is Identity here); positions shift by `step`."""
        x = self.fc(torch.cat((self.embed_tokens(input_ids).to(hidden_states.dtype), hidden_states), dim=-1))
        layer = self.layers[0]
        pos = torch.arange(step, step + x.shape[1], device=x.device).unsqueeze(0)
        pos_emb = self.rotary_emb(x, pos)
        impl = ttt_attention.implementation(self.config)
        x = x + ttt_attention.run_attention(layer.self_attn, layer.input_layernorm(x), pos_emb, cache, mask0, impl)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def compute_logits(self, h):
        return self.lm_head(h.to(self.lm_head.weight.dtype))

    # ---- save / load --------------------------------------------------------------------
    def serving_tensors(self, with_embed=True):
        """Serving-layout weights, not copied: fc.*, layers.0.* (+ embed_tokens.weight). No lm_head, no rotary
        buffers."""
        sd = {k: v for k, v in self.state_dict().items()
              if k.startswith("fc.") or k.startswith("layers.")}
        if with_embed:
            sd["embed_tokens.weight"] = self.embed_tokens.weight
        return sd

    def trainable_state_dict(self, with_embed=True):
        return {k: v.detach().contiguous().cpu() for k, v in self.serving_tensors(with_embed).items()}

    @staticmethod
    def config_from_dict(cfg_dict):
        """The config of a saved draft's config.json (a copy of its target family's config, one layer)."""
        cfg_dict = dict(cfg_dict)
        config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
        config.fc_bias = fc_bias(config)
        return config

    def save_pretrained(self, out_dir, with_embed=True, dtype=None):
        """Write config.json + model.safetensors (SGLang/vLLM EAGLE layout), atomically."""
        sd = self.trainable_state_dict(with_embed=with_embed)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        cfg = draft_config_dict(self.config.to_dict(), dtype or self.fc.weight.dtype)
        save_draft_folder(out_dir, sd, cfg, WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, draft_dir, target=None, attn_implementation="sdpa", dtype=torch.float32):
        """Load a saved draft; the frozen lm_head (and embed when not saved) come from `target`
        (name/path/None = the config's target_model, or a loaded nn.Module)."""
        from modules import target_weights

        draft_dir = Path(draft_dir)
        config = AutoConfig.from_pretrained(draft_dir)
        config._attn_implementation = attn_implementation
        sd = load_file(str(draft_dir / WEIGHTS_NAME))
        config.fc_bias = "fc.bias" in sd  # exports always carry one (zeros when trained without)
        draft = cls(config).to(dtype)
        if target is None:
            target = getattr(config, "target_model", None)
        embed, head = target_weights.load_embed_and_head(target)
        draft.load_frozen(embed, head)
        if "embed_tokens.weight" in sd:
            saved = sd.pop("embed_tokens.weight")
            if saved.shape != draft.embed_tokens.weight.shape:
                raise ValueError(f"{draft_dir}: embed_tokens {tuple(saved.shape)} does not fit the target")
            if head is embed:  # keep the tie: the head must stay the target's
                draft.embed_tokens.weight = nn.Parameter(saved.to(dtype), requires_grad=False)
            else:
                draft.embed_tokens.weight.data.copy_(saved)
        missing, unexpected = draft.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k.startswith(("fc.", "layers."))]
        if missing or unexpected:
            raise ValueError(f"{draft_dir / WEIGHTS_NAME}: missing keys {missing}, unexpected keys {unexpected}")
        return draft


# ---- export for the engines (the rules: modules/export/engines.py) ------------------------------

OFFICIAL_WEIGHTS_NAME = "pytorch_model.bin"


class ExportError(ValueError):
    """The draft does not fit the target (or the checkpoint is incomplete)."""


def expected_shapes(target_cfg, bias=False):
    """{key: shape} of a draft for this target, computed without allocating weights."""
    with torch.device("meta"):
        draft = EagleDraft(make_draft_config(target_cfg, bias=bias))
    return {k: tuple(v.shape) for k, v in draft.serving_tensors(with_embed=True).items()}


def check_fits_target(state_dict, target_cfg, where):
    """Raise ExportError naming every missing / unexpected / mis-shaped key."""
    want = expected_shapes(target_cfg, bias="fc.bias" in state_dict)
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {have[k]}, the target needs {want[k]}"
                 for k in want if k in have and have[k] != want[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ExportError(f"{where}: draft does not fit the target: {shown}")


def export_draft(draft, out_dir, target=None, dtype=torch.bfloat16, warn=print, portable=True):
    """Write a draft (an EagleDraft or a checkpoint folder) in both layouts to out_dir.

    target: the target model (name/path/module); None = the checkpoint's config.target_model.
    dtype: bf16 by default (what engines run); None keeps the training dtype.
    portable: write `target_model` without the local path (a folder to share); False keeps it, for a
    training run's own output that our scripts reload on the same machine.
    Returns the output folder; `warn` receives what an engine would not serve as trained.
    """
    from modules.target_weights import load_embed_and_head, target_config

    if isinstance(draft, EagleDraft):
        # Training keeps the frozen embedding in its compute dtype (modules/training/eagle_trainer.py): a bf16 copy
        # of an fp32 target's embedding is not the target's, so take that one from the target.
        exact = draft.embed_tokens.weight.dtype == draft.fc.weight.dtype
        sd, cfg, where = draft.trainable_state_dict(with_embed=exact), draft.config.to_dict(), "draft"
    else:
        folder = Path(draft)
        for name in ("config.json", WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise ExportError(f"{folder}: no {name} (not a draft checkpoint folder)")
        cfg = json.loads((folder / "config.json").read_text())
        sd, where = load_file(str(folder / WEIGHTS_NAME)), folder / WEIGHTS_NAME
    if target is None:
        target = cfg.get("target_model")
    tcfg = target_config(target)
    if "embed_tokens.weight" not in sd:  # a checkpoint saved without it (all do): take the target's
        sd["embed_tokens.weight"] = load_embed_and_head(target)[0].to(sd["fc.weight"].dtype)
    check_fits_target(sd, tcfg, where)
    try:
        _, served_by = engines.eagle_architectures(tcfg.model_type)
    except engines.EngineConventionError as err:
        raise ExportError(f"{where}: {err}") from err
    sd["fc.bias"], vllm_as_trained = engines.eagle_fc_bias(sd)
    if not vllm_as_trained:
        warn(f"warning: {where} was trained with a non-zero fc bias; vLLM drops fc.bias (serve it in SGLang "
             f"or eagle-llm, or retrain with --no-bias)")
    if "vllm" not in served_by:
        warn(f"note: vLLM 0.32 has no EAGLE-1/2 class for {tcfg.model_type} targets; served by: {', '.join(served_by)}")
    dtype = dtype or sd["fc.weight"].dtype
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    cfg = draft_config_dict(cfg, dtype)
    cfg["fc_bias"] = True
    if portable:
        cfg["target_model"] = engines.portable_name(cfg.get("target_model"))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    # the official loader reads only a torch .bin; a plain dict of tensors (loads with weights_only=True)
    atomic_write(out / OFFICIAL_WEIGHTS_NAME, lambda p: torch.save(sd, str(p)))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2, sort_keys=True)))
    return out


# ---- the registry entry (modules/draft/kinds.py) --------------------------------------------

class Eagle2Adapter(DraftAdapter):
    """EAGLE-1/2 draft (EagleDraft): features = the target's last hidden state, target's lm_head.

    vocab_ids: optional LongTensor of target token ids the draft may propose. The draft's lm_head
    then scores only those rows: on a small target the full head is a large part of a draft step
    (SmolLM2: 49152 x 576, a fifth of the target's weights, read once per tree level). Which
    tokens the draft proposes never changes the output (the target verifies every token), only
    how often proposals are accepted.
    """

    def __init__(self, draft, vocab_ids=None):
        self.draft = draft
        self.vocab_ids = None
        if vocab_ids is not None:
            w = draft.lm_head.weight
            self.vocab_ids = torch.as_tensor(vocab_ids, device=w.device).long().unique()
            self.head_weight = w[self.vocab_ids].contiguous()

    def check_target(self, target):
        tcfg = target.config.get_text_config()
        dcfg = self.draft.config
        problems = []
        if dcfg.hidden_size != tcfg.hidden_size:
            problems.append(f"hidden size {dcfg.hidden_size} vs target {tcfg.hidden_size}")
        head = target.get_output_embeddings()
        dvocab = self.draft.lm_head.weight.shape[0]
        if head is not None and dvocab != head.weight.shape[0]:
            problems.append(f"vocab {dvocab} vs target {head.weight.shape[0]}")
        if problems:
            raise ValueError("draft does not fit the target: " + "; ".join(problems))

    def forward(self, input_ids, features, position_ids, attention_mask, cache):
        out, _ = self.draft(input_ids, features.to(self.draft.fc.weight.dtype), attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out

    def logprobs(self, hidden):
        if self.vocab_ids is None:
            logits = self.draft.compute_logits(hidden)
        else:
            logits = torch.nn.functional.linear(hidden.to(self.head_weight.dtype), self.head_weight)
        return torch.log_softmax(logits.float(), dim=-1)

    def to_target_ids(self, draft_ids):
        return draft_ids if self.vocab_ids is None else self.vocab_ids[draft_ids]


class Eagle2Kind(DraftKind):
    """EAGLE-1/2: the target's last hidden state in, the target's frozen lm_head out (full vocabulary)."""

    name = "eagle2"
    draft_class = EagleDraft
    loss_weights = {"w_reg": 1.0, "w_cls": 0.1, "noise_std": 0.2}
    export_files = ("config.json", "model.safetensors", "pytorch_model.bin")
    vllm_method = "eagle"  # vLLM 0.32: config/speculative.py

    def owns_config(self, config):
        # ours say eagle_version 2; official and engine checkpoints carry none (kinds.FALLBACK: when no other claims)
        return config.get("eagle_version", 2) == 2

    def build(self, target, bias=False, attn_implementation="sdpa", weights=None, **_):
        draft = self.draft_class.from_target(target, bias=bias, attn_implementation=attn_implementation,
                                            load_head=weights is None)
        if weights is not None:
            draft.load_frozen(*weights)
        return draft

    train_script = "train/train.py"  # EagleTrainer (train_eagle_ttt.py --arch eagle2 also trains it, with the TTT loss)

    def train_command(self, ttt_steps):
        return [self.train_script, "--arch", self.name]  # EagleTrainer unrolls no steps

    def tree_adapter(self, draft, vocab_ids=None):
        return Eagle2Adapter(draft, vocab_ids)

    def save_trained(self, draft, out_dir, target):
        return export_draft(draft, out_dir, target=target, dtype=None, portable=False)

    def export(self, draft, out_dir, target=None, dtype=torch.bfloat16):
        return export_draft(draft, out_dir, target=target, dtype=dtype)


KIND = Eagle2Kind()
