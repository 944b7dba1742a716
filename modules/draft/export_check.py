"""Is an export complete? Its weights file against the tensors its kind's config says it must hold.

vLLM 0.32 loads a draft with a weight missing without a word (the module keeps its random or zero init:
docs/serving.md), so an export is checked after it is written (train/export.py) and before it is served
(the hybrid plugin, modules/vllm_plugin/). What must be there is decided in one place: the kind's
`export_tensors(config)` (modules/draft/kinds.py), the draft built from the export's own config.json on the
meta device, in its serving layout. Extra tensors are refused too: an engine ignores them just as silently.
"""
import json
from pathlib import Path

from modules.draft.kinds import DraftKind, kind_of_folder

WEIGHTS_NAME = "model.safetensors"  # what vLLM and SGLang load (every kind writes it)


class IncompleteExportError(ValueError):
    """An export whose weights do not match what its kind and config need (one-line message)."""


def export_problems(folder) -> tuple[DraftKind, list[str]]:
    """(the folder's kind, what is wrong with its weights file: missing, unexpected and mis-shaped tensors)."""
    from safetensors import safe_open

    folder = Path(folder)
    kind = kind_of_folder(folder)
    missing_files = [name for name in kind.export_files if not (folder / name).is_file()]
    if missing_files:
        return kind, [f"no {name}" for name in missing_files]
    want = kind.export_tensors(json.loads((folder / "config.json").read_text()))
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {list(have[k])}, its config needs {list(want[k])}"
                 for k in want if k in have and have[k] != want[k]]
    return kind, problems


def check_export(folder) -> DraftKind:
    """The folder's kind; IncompleteExportError (one line) when its weights are not exactly what it needs."""
    kind, problems = export_problems(folder)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        raise IncompleteExportError(f"{Path(folder).name}: incomplete {kind.name} export, refused: {shown}")
    return kind
