"""Load any saved draft; its kind (EAGLE-1/2, EAGLE-3, ...) is decided by the registry, modules/draft/kinds.py.

`load_draft(dir, target_model=None)`: target_model is a model name/path, a loaded nn.Module,
or None (= the `target_model` recorded in the draft's config.json).
"""
import torch

from modules.cpu_linear import pack_linears
from modules.draft.kinds import kind_of_folder


def draft_kind(draft_dir):
    """The registered name of a saved draft's kind ('eagle2', 'eagle3', ...), from its config.json."""
    return kind_of_folder(draft_dir).name


def load_draft(draft_dir, target_model=None, dtype=torch.float32, attn_implementation="sdpa"):
    """The draft in `dtype`; its fp32 linear layers run oneDNN packed weights when used on CPU without
    autograd (modules/cpu_linear.py: packed lazily on first use, so moving it to a GPU costs nothing)."""
    kind = kind_of_folder(draft_dir)
    draft = kind.load(draft_dir, target_model, dtype=dtype, attn_implementation=attn_implementation)
    pack_linears(draft)
    return draft
