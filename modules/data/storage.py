"""On-disk EAGLE training data: safetensors shards of packed conversations plus a manifest.

A data folder is what one generate_data.py run writes for a row slice [start, end):

    manifest.json
    shard-<first_row:08d>-<end_row:08d>.safetensors   (one per block of rows_per_shard rows)

Each shard holds every kept conversation of its rows, packed end to end (no padding):
    input_ids          int32  [N_tok]
    loss_mask          uint8  [N_tok]          1 = assistant-reply token or its closing end-of-turn token
    hidden_states      bf16   [N_tok, H]       target's last hidden state (post final norm)
    aux_hidden_states  bf16   [N_tok, k*H]     optional: EAGLE-3 fused low/mid/high features
    offsets            int64  [n_conv + 1]     conversation c = tokens offsets[c]:offsets[c+1]
    row_ids            int64  [n_conv]         dataset row of each conversation
and str metadata: format, first_row, end_row, rows, tokens, trained_tokens, truncated, skipped (JSON).

Shards are written under a temporary name and renamed, so a killed run leaves only whole shards
and a rerun continues from the first missing one. The format is readable with `safetensors` alone.
"""
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modules.io import atomic_write_text

FORMAT = "eagle-data-v1"
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-(\d{8})-(\d{8})\.safetensors$")
SHARD_KEYS = ("input_ids", "loss_mask", "hidden_states", "offsets", "row_ids")
# Memory-mapped shards a reader keeps open at once (per process: each DataLoader worker has its own).
# Linux allows 65,530 maps per process by default; a large data set has tens of thousands of shards.
MAX_OPEN_SHARDS = 64


class DataFormatError(RuntimeError):
    """Missing, empty or corrupt data folder/shard (the message names the file)."""


# ----------------------------------------------------------------------------- writing

def shard_name(first_row: int, end_row: int) -> str:
    return f"shard-{first_row:08d}-{end_row:08d}.safetensors"


ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32",
             torch.int64: "I64", torch.uint8: "U8"}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a standard safetensors file with a byte-for-byte deterministic layout.

    safetensors' own writer orders the metadata map differently from run to run; here keys are
    sorted, so the same data always gives the same file (a resumed run can be compared bytewise).
    Layout: u64 little-endian header size, JSON header (padded with spaces to 8 bytes), raw data.
    """
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy


def pack_conversations(conversations: list[dict], hidden_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Concatenate conversations ({input_ids, loss_mask, hidden_states, [aux_hidden_states], row_id})
    into the shard tensors. Works for zero conversations (a shard whose rows were all skipped)."""
    lengths = [len(c["input_ids"]) for c in conversations]
    offsets = torch.zeros(len(conversations) + 1, dtype=torch.int64)
    if lengths:
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)

    def cat(key, dtype, width=None):
        parts = [torch.as_tensor(c[key]).to(dtype) for c in conversations]
        if parts:
            return torch.cat(parts).contiguous()
        return torch.zeros((0,) if width is None else (0, width), dtype=dtype)

    hidden = cat("hidden_states", hidden_dtype, conversations[0]["hidden_states"].shape[-1] if conversations else 0)
    tensors = {
        "input_ids": cat("input_ids", torch.int32),
        "loss_mask": cat("loss_mask", torch.uint8),
        "hidden_states": hidden,
        "offsets": offsets,
        "row_ids": torch.tensor([int(c["row_id"]) for c in conversations], dtype=torch.int64),
    }
    if conversations and "aux_hidden_states" in conversations[0]:
        tensors["aux_hidden_states"] = cat("aux_hidden_states", hidden_dtype)
    return tensors


def write_shard(folder: str | Path, first_row: int, end_row: int, conversations: list[dict],
                skipped: dict[str, int], hidden_dtype: torch.dtype = torch.bfloat16, truncated: int = 0) -> dict:
    """Write one shard atomically; return its stats (the same as its metadata, decoded)."""
    tensors = pack_conversations(conversations, hidden_dtype)
    stats = {
        "format": FORMAT, "first_row": first_row, "end_row": end_row,
        "rows": len(conversations), "tokens": int(tensors["input_ids"].numel()),
        "trained_tokens": int(tensors["loss_mask"].sum()), "truncated": truncated,
        "skipped": dict(sorted(skipped.items())),
    }
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in stats.items()}
    path = Path(folder) / shard_name(first_row, end_row)
    tmp = Path(str(path) + ".tmp")
    try:
        save_safetensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no half-written shard behind
        raise
    stats["bytes"] = path.stat().st_size
    return stats


def write_manifest(folder: str | Path, manifest: dict) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


# ----------------------------------------------------------------------------- reading

def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataFormatError(f"no {MANIFEST} in {folder}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"corrupt manifest {path}: {err}") from err
    if manifest.get("format") != FORMAT:
        raise DataFormatError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def list_shards(folder: str | Path) -> list[Path]:
    """Whole shards in a folder, sorted by first row (temporary files of a killed run are ignored)."""
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := SHARD_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_shard_stats(path: str | Path) -> dict:
    """The metadata of one shard, decoded (first_row, end_row, rows, tokens, trained_tokens, skipped)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DataFormatError(f"corrupt shard {path}: {err}") from err
    if meta.get("format") != FORMAT:
        raise DataFormatError(f"shard {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    stats = {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}
    stats["bytes"] = Path(path).stat().st_size
    return stats


def find_data_folders(dirs) -> list[Path]:
    """A folder holding manifest.json, or a parent whose (sorted) subfolders hold them; or a list."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    folders = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise DataFormatError(f"data folder not found: {d}")
        if (d / MANIFEST).is_file():
            folders.append(d)
            continue
        subs = sorted(p for p in d.iterdir() if (p / MANIFEST).is_file())
        if not subs:
            raise DataFormatError(f"no {MANIFEST} in {d} or its subfolders: not EAGLE data (run generate_data.py)")
        folders.extend(subs)
    return folders


class EagleDataset(torch.utils.data.Dataset):
    """All conversations of one or more data folders, memory-mapped, one conversation per item.

    ds[i] -> {"input_ids": LongTensor[T], "loss_mask": LongTensor[T], "hidden_states": Tensor[T,H],
              ["aux_hidden_states": Tensor[T,k*H]], "row_id": int}
    """

    def __init__(self, dirs, read_aux=True, max_open_shards=MAX_OPEN_SHARDS):
        """read_aux=False: leave fused features on disk (EAGLE-1/2 training needs only the last
        hidden state; reading them would touch ~4x the pages of the memory map).
        max_open_shards: memory maps kept open at once; the least recently read shard is closed
        when one more is needed."""
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.max_open_shards = max_open_shards
        self.folders = find_data_folders(dirs)
        self._read_aux_wanted = read_aux
        self.manifests = [read_manifest(f) for f in self.folders]
        self._check_compatible()
        self.shards: list[Path] = []
        shard_ids, starts, ends, row_ids = [], [], [], []
        for folder in self.folders:
            for path in list_shards(folder):
                offsets, rows, keys = self._read_index(path)
                k = len(self.shards)
                self.shards.append(path)
                shard_ids += [k] * len(rows)
                starts.append(offsets[:-1])
                ends.append(offsets[1:])
                row_ids.append(rows)
                if self.has_aux and rows.numel() and "aux_hidden_states" not in keys:
                    raise DataFormatError(f"corrupt shard {path}: manifest has aux_layers but no aux_hidden_states")
        if not shard_ids:
            raise DataFormatError(f"no conversations in {', '.join(map(str, self.folders))}")
        self._shard = torch.tensor(shard_ids, dtype=torch.int64)
        self._start = torch.cat(starts)
        self._end = torch.cat(ends)
        self.row_ids = torch.cat(row_ids)
        self._handles = OrderedDict()  # shard index -> open safe_open handle, least recently read first
        self._pid = os.getpid()

    def _check_compatible(self):
        first = self.manifests[0]
        for folder, m in zip(self.folders, self.manifests):
            for key in ("hidden_size", "model", "aux_layers", "dtype"):
                if m.get(key) != first.get(key):
                    raise DataFormatError(
                        f"{folder}: {key}={m.get(key)!r} differs from {self.folders[0]}: {first.get(key)!r}")
        self.hidden_size = int(first["hidden_size"])
        self.model_name = first["model"]
        self.aux_layers = first.get("aux_layers")
        self.has_aux = bool(self.aux_layers)
        self.read_aux = self.has_aux and self._read_aux_wanted

    @staticmethod
    def _read_index(path: Path):
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                missing = [k for k in SHARD_KEYS if k not in keys]
                if missing:
                    raise DataFormatError(f"corrupt shard {path}: missing tensors {missing}")
                offsets, rows = f.get_tensor("offsets"), f.get_tensor("row_ids")
                n_tok = f.get_slice("input_ids").get_shape()[0]
        except (SafetensorError, OSError) as err:
            raise DataFormatError(f"corrupt shard {path}: {err}") from err
        if len(offsets) != len(rows) + 1 or int(offsets[-1]) != n_tok or int(offsets[0]) != 0:
            raise DataFormatError(f"corrupt shard {path}: offsets do not match input_ids")
        return offsets, rows, keys

    def __len__(self) -> int:
        return len(self._shard)

    @property
    def lengths(self) -> torch.Tensor:
        """Token count of every conversation (for length-grouped batching)."""
        return self._end - self._start

    def token_pairs(self, indices=None):
        """(input_ids, loss_mask) of the given conversations (default all), reading only those two
        tensors (the hidden states, 99% of the bytes, are never touched)."""
        for i in range(len(self)) if indices is None else indices:
            k, a, b = int(self._shard[i]), int(self._start[i]), int(self._end[i])
            f = self._open(k)
            yield f.get_slice("input_ids")[a:b], f.get_slice("loss_mask")[a:b]

    def _open(self, k: int):
        """The open handle of shard k: at most max_open_shards memory maps per process, least
        recently read closed first. A forked DataLoader worker drops the maps it inherited and
        opens its own."""
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        f = self._handles.get(k)
        if f is not None:
            self._handles.move_to_end(k)
            return f
        while len(self._handles) >= self.max_open_shards:
            self._handles.popitem(last=False)  # the last reference: the map is closed here
        f = self._handles[k] = safe_open(str(self.shards[k]), framework="pt")
        return f

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = int(i) % len(self)
        k, a, b = int(self._shard[i]), int(self._start[i]), int(self._end[i])
        f = self._open(k)
        item = {
            "input_ids": f.get_slice("input_ids")[a:b].long(),
            "loss_mask": f.get_slice("loss_mask")[a:b].long(),
            "hidden_states": f.get_slice("hidden_states")[a:b],
            "row_id": int(self.row_ids[i]),
        }
        if self.read_aux:
            item["aux_hidden_states"] = f.get_slice("aux_hidden_states")[a:b]
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # open maps do not travel: each worker opens its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()
