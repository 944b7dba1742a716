"""Export a trained EAGLE-3 draft (a checkpoint folder or an Eagle3Draft) in the SGLang EAGLE-3 layout.

The training checkpoints already use that layout (Eagle3Draft.save_pretrained); exporting re-checks
the draft against the target (hidden size, vocabulary, aux layer ids, d2t/t2d consistency),
optionally casts the weights (bf16 halves the files; d2t/t2d keep their int64/bool types) and
writes a clean folder without trainer files. `train/export.py` handles EAGLE-1/2.
"""
from pathlib import Path

import torch


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


def export_eagle3(draft, out_dir, target=None, dtype=None):
    """draft: an Eagle3Draft or a folder holding one. target: name/path/module (None = the config's
    target_model). Returns the output folder."""
    from modules.eagle3_draft import Eagle3Draft
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
    check_fits_target(draft, target_config(target), where)
    draft.save_pretrained(out_dir, with_embed=True, dtype=dtype)
    return Path(out_dir)
