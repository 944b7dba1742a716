"""Export an EAGLE-1/2 draft for the serving engines and the official EAGLE code.

One output folder serves all of them (the rules and the engine versions: modules/export/engines.py):
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
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modules.export import engines
from modules.draft.eagle_draft import WEIGHTS_NAME, EagleDraft, draft_config_dict, make_draft_config
from modules.data.storage import atomic_write

OFFICIAL_WEIGHTS_NAME = "pytorch_model.bin"


class ExportError(ValueError):
    """The draft does not fit the target (or the checkpoint is incomplete)."""


def expected_shapes(target_cfg, bias=False):
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
        raise ExportError(f"{where}: {err}") from None
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
