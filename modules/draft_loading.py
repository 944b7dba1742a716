"""Load any saved draft by its config: EAGLE-1/2 (modules/eagle_draft.py) or EAGLE-3 (modules/eagle3_draft.py).

`load_draft(dir, target_model=None)`: target_model is a model name/path, a loaded nn.Module,
or None (= the `target_model` recorded in the draft's config.json).
"""
import json
from pathlib import Path

import torch


def draft_kind(draft_dir):
    """'eagle2' or 'eagle3' from config.json (architectures / eagle_version)."""
    cfg_file = Path(draft_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no draft config (is {draft_dir} a draft folder?)")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if cfg.get("eagle_version") == 3 or any("Eagle3" in a for a in archs):
        return "eagle3"
    return "eagle2"


def _load_eagle2(draft_dir, target_model, **kw):
    from modules.eagle_draft import EagleDraft
    return EagleDraft.from_pretrained(draft_dir, target=target_model, **kw)


def _load_eagle3(draft_dir, target_model, **kw):
    from modules.eagle3_draft import Eagle3Draft
    return Eagle3Draft.from_pretrained(draft_dir, target=target_model, **kw)


# kind -> loader(draft_dir, target_model, **kw); imported lazily so callers need no extra import.
LOADERS = {"eagle2": _load_eagle2, "eagle3": _load_eagle3}


def load_draft(draft_dir, target_model=None, dtype=torch.float32, attn_implementation="sdpa"):
    kind = draft_kind(draft_dir)
    if kind not in LOADERS:
        raise ValueError(f"{draft_dir}: draft kind '{kind}' has no loader registered")
    return LOADERS[kind](draft_dir, target_model, dtype=dtype, attn_implementation=attn_implementation)
