"""Export a trained EAGLE-3 draft (a checkpoint folder or an Eagle3Draft) in the SGLang EAGLE-3 layout.

The training checkpoints already use that layout (Eagle3Draft.save_pretrained); exporting re-checks
the draft against the target (hidden size, vocabulary, aux layer ids, d2t/t2d consistency),
casts the weights (bf16 by default; d2t/t2d keep their int64/bool types), writes the capture
layers in each engine's convention (modules/export/engines.py) and a clean folder without trainer files.
`train/export.py` handles EAGLE-1/2.
"""
from pathlib import Path

import torch

from modules.export import engines


class Eagle3ExportError(ValueError):
    """A draft that does not fit its target or is internally inconsistent (one-line message)."""


def check_fits_target(draft, target_config, where="draft"):
    t = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
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
        raise Eagle3ExportError(str(err)) from None
    sd = draft.serving_state_dict(with_embed=True)
    if sorted_ids != ids:
        h = draft.fused_size // len(ids)
        blocks = sd["fc.weight"].split(h, dim=1)
        sd["fc.weight"] = torch.cat([blocks[ids.index(i)] for i in sorted_ids], dim=1)
    cfg = draft.config_dict()
    cfg.pop(engines.AUX_KEY, None)
    cfg.update(engines.aux_layer_fields(sorted_ids, num_target_layers))
    cfg["target_model"] = engines.portable_name(cfg.get("target_model"))
    return sd, cfg


def export_eagle3(draft, out_dir, target=None, dtype=torch.bfloat16):
    """draft: an Eagle3Draft or a folder holding one. target: name/path/module (None = the config's
    target_model). dtype: bf16 by default (None keeps the training dtype). Returns the output folder."""
    from modules.draft.eagle3_draft import Eagle3Draft, cast_floats
    from modules.data.storage import save_draft_folder
    from modules.target_weights import target_config

    where = "draft"
    if not isinstance(draft, Eagle3Draft):
        where = Path(draft)
        if not (where / "config.json").is_file() or not (where / "model.safetensors").is_file():
            raise Eagle3ExportError(f"{where}: no config.json / model.safetensors (not a draft folder)")
        try:
            draft = Eagle3Draft.from_pretrained(where, target=target)
        except (ValueError, RuntimeError) as err:
            raise Eagle3ExportError(str(err).splitlines()[0]) from None
    if target is None:
        target = getattr(draft.config, "target_model", None)
    tcfg = target_config(target)
    check_fits_target(draft, tcfg, where)
    sd, cfg = engine_layout(draft, tcfg.num_hidden_layers, where)
    dtype = dtype or draft.fc.weight.dtype
    cfg.update(engines.dtype_fields(dtype))
    save_draft_folder(out_dir, cast_floats(sd, dtype), cfg, "model.safetensors")
    return Path(out_dir)
