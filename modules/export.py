"""Export an EAGLE-1/2 draft for the serving engines and the official EAGLE code.

One output folder serves all of them:
  config.json          LlamaConfig-style, num_hidden_layers 1, architectures ["LlamaForCausalLMEagle"]
                       (SGLang's class name; vLLM maps it too), "bias" for fc, plus the pre-5.x
                       rope fields ("rope_theta", "rope_scaling") that older loaders read
  model.safetensors    SGLang / vLLM: fc.*, layers.0.*, embed_tokens.weight
  pytorch_model.bin    official `eagle-llm` EaModel (loads only this name, strict, needs embed_tokens)
Before writing, the keys and shapes are checked against the target's config: a draft for another
target (hidden size, vocab, heads, intermediate size) is refused with the differences listed.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modules.eagle_draft import EAGLE_ARCHITECTURE, WEIGHTS_NAME, EagleDraft, make_draft_config
from modules.storage import atomic_write

OFFICIAL_WEIGHTS_NAME = "pytorch_model.bin"


class ExportError(ValueError):
    """The draft does not fit the target (or the checkpoint is incomplete)."""


def expected_shapes(target_cfg, bias=True):
    """{key: shape} of a draft for this target, computed without allocating weights."""
    with torch.device("meta"):
        draft = EagleDraft(make_draft_config(target_cfg, bias=bias))
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items() if k.startswith(("fc.", "layers."))}
    shapes["embed_tokens.weight"] = tuple(draft.embed_tokens.weight.shape)
    return shapes


def check_fits_target(state_dict, target_cfg, where):
    """Raise ExportError naming every missing / unexpected / mis-shaped key."""
    want = expected_shapes(target_cfg, bias="fc.bias" in state_dict)
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {have[k]}, the target needs {want[k]}" for k in want if k in have and have[k] != want[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ExportError(f"{where}: draft does not fit the target: {shown}")


def serving_config(cfg: dict, bias: bool) -> dict:
    """Our config plus the fields SGLang / vLLM / official EAGLE read."""
    cfg = dict(cfg)
    cfg["architectures"] = [EAGLE_ARCHITECTURE]
    cfg["num_hidden_layers"] = 1
    cfg["bias"] = bias
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type", "default")
    # pre-5.x loaders: rope_scaling None means plain RoPE; they do not know rope_type "default"
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "rope_type": rope_type,
                                                                **{k: v for k, v in rope.items() if k != "rope_theta"}}
    cfg.pop("_attn_implementation_autoset", None)
    return cfg


def export_draft(draft, out_dir, target=None, dtype=None):
    """Write a draft (an EagleDraft or a checkpoint folder) in both layouts to out_dir.

    target: the target model (name/path/module); None = the checkpoint's config.target_model.
    dtype: e.g. torch.bfloat16 to halve the files; None keeps the training dtype.
    """
    from modules.target_weights import load_embed_and_head, target_config

    if isinstance(draft, EagleDraft):
        sd, cfg, where = draft.trainable_state_dict(with_embed=True), draft.config.to_dict(), "draft"
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
    if "embed_tokens.weight" not in sd:  # a checkpoint saved without it: take the target's
        sd["embed_tokens.weight"] = load_embed_and_head(target)[0]
    check_fits_target(sd, tcfg, where)
    bias = "fc.bias" in sd
    if "bias" in cfg and bool(cfg["bias"]) != bias:
        raise ExportError(f"{where}: config says bias={cfg['bias']} but fc.bias is {'present' if bias else 'absent'}")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        cfg["dtype"] = str(dtype).replace("torch.", "")
    sd = {k: v.contiguous() for k, v in sd.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    # the official loader reads only a torch .bin; a plain dict of tensors (loads with weights_only=True)
    atomic_write(out / OFFICIAL_WEIGHTS_NAME, lambda p: torch.save(sd, str(p)))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(serving_config(cfg, bias), indent=2, sort_keys=True)))
    return out
