"""Bottom layer: writing files safely (temp file + rename) and the safetensors helpers every stage uses.

A leaf: it imports nothing from modules/, so data/, draft/, export/ and training/ can all use it
(the layering rule: docs/extending.md#layers, checked by tests/test_imports_acyclic.py).
"""
import json
import os
from pathlib import Path


def atomic_write(path, write) -> None:
    """write(tmp_path), then rename onto path: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_draft_folder(out_dir, tensors: dict, config: dict, weights_name: str = "model.safetensors") -> Path:
    """A draft as the serving engines read it: config.json + model.safetensors, each atomic."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / weights_name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def cast_floats(sd: dict, dtype) -> dict:
    """Float tensors to dtype (None = unchanged); integer and bool tensors (d2t / t2d) keep their type."""
    if dtype is None:
        return sd
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
