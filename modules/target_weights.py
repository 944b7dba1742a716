"""Read only the target's embedding and lm_head (and its config), never the whole model.

A draft needs two frozen [vocab, hidden] matrices from the target. Reading the full target
for them wastes memory (8B params for two 0.5B matrices on Llama-3.1-8B), so we open the
weight files and pull just those tensors:
- safetensors, single file or sharded (model.safetensors.index.json tells which shard);
- GGUF (token_embd / output, dequantized with the `gguf` package);
- pytorch_model.bin (torch.load(weights_only=True, mmap=True)) as a last resort;
- a loaded nn.Module (its get_input_embeddings / get_output_embeddings).
Tied embeddings (SmolLM2: no lm_head tensor, tie_word_embeddings) return the SAME tensor twice.
A hub id is resolved through huggingface_hub, downloading only config + the needed shards.
"""
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "transformer.wte.weight")
HEAD_KEYS = ("lm_head.weight", "model.lm_head.weight")


def _resolve(target):
    """-> (kind, location, gguf_file) with kind in {"module", "config", "gguf", "dir"}."""
    if isinstance(target, nn.Module):
        return "module", target, None
    if hasattr(target, "model_type"):
        return "config", target, None
    from modules.target import resolve_model

    if isinstance(target, Path):
        target = str(target)
    path_or_id, gguf_file = resolve_model(target)  # None / the embedded name -> the embedded GGUF
    if gguf_file:
        return "gguf", Path(path_or_id), gguf_file
    p = Path(path_or_id)
    if p.is_dir():
        if not any(p.glob("*.safetensors")) and not (p / "pytorch_model.bin").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return "gguf", p, ggufs[0].name
        return "dir", p, None
    return "dir", _hub_snapshot(path_or_id), None


def _hub_snapshot(repo_id):
    """Download config + just the files holding the embedding / lm_head; return the snapshot dir."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder = Path(hf_hub_download(repo_id, "config.json")).parent
    try:
        index = Path(hf_hub_download(repo_id, "model.safetensors.index.json"))
        weight_map = json.loads(index.read_text())["weight_map"]
        for k in EMBED_KEYS + HEAD_KEYS:
            if k in weight_map:
                hf_hub_download(repo_id, weight_map[k])
    except EntryNotFoundError:
        hf_hub_download(repo_id, "model.safetensors")
    return folder


def target_name(target):
    """A printable name for config fields (None -> the embedded GGUF path)."""
    if isinstance(target, nn.Module):
        return getattr(target.config, "_name_or_path", None) or type(target).__name__
    if hasattr(target, "model_type"):
        return getattr(target, "_name_or_path", None) or target.model_type
    from modules.target import model_display_name
    return model_display_name(None if target is None else str(target))


def target_config(target):
    """The target's (text) config without loading weights."""
    kind, loc, gguf_file = _resolve(target)
    if kind == "module":
        cfg = loc.config
    elif kind == "config":
        cfg = loc
    elif kind == "gguf":
        cfg = AutoConfig.from_pretrained(loc, gguf_file=gguf_file)
    else:
        cfg = AutoConfig.from_pretrained(loc)
    return text_config(cfg)


def text_config(config):
    """The text model's part of a config (a multimodal target's language model; a text model's own config). The
    one place that decides it: drafts, data and engines read the target's sizes through it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _from_safetensors(folder):
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        weight_map = {}
        for f in files:
            with safe_open(str(f), "pt") as sf:
                weight_map.update({k: f.name for k in sf.keys()})

    def read(keys):
        for k in keys:
            if k in weight_map:
                f = folder / weight_map[k]
                if not f.exists():
                    raise FileNotFoundError(f"{f}: shard named in the index is missing")
                with safe_open(str(f), "pt") as sf:
                    return sf.get_tensor(k)
        return None

    return read(EMBED_KEYS), read(HEAD_KEYS)


def _from_bin(folder):
    f = folder / "pytorch_model.bin"
    if not f.exists():
        return None
    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)

    def pick(keys):
        return next((sd[k] for k in keys if k in sd), None)

    return pick(EMBED_KEYS), pick(HEAD_KEYS)


def _from_gguf(folder, gguf_file):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(folder / gguf_file))
    found = {}
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            # dequantize returns numpy [rows=vocab, cols=hidden] in the file's row-major order
            found[t.name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
    return found.get("token_embd.weight"), found.get("output.weight")


def load_embed_and_head(target=None):
    """-> (embed [V,H], head [V,H]); head IS embed when the target ties them. Frozen copies."""
    kind, loc, gguf_file = _resolve(target)
    if kind == "config":
        raise ValueError("a bare config has no weights: pass the model path or the loaded model")
    if kind == "module":
        embed = loc.get_input_embeddings().weight.detach()
        out = loc.get_output_embeddings()
        head = out.weight.detach() if out is not None else embed
        if head.data_ptr() == embed.data_ptr():
            head = embed
        return embed, head
    if kind == "gguf":
        # GGUF files store no output.weight when embeddings are tied (llama.cpp convention)
        embed, head = _from_gguf(loc, gguf_file)
        where = loc / gguf_file
        if embed is not None and head is None:
            head = embed
    else:
        pair = _from_safetensors(loc) or _from_bin(loc)
        if pair is None:
            raise FileNotFoundError(f"{loc}: no *.safetensors, index or pytorch_model.bin with the target weights")
        embed, head = pair
        where = loc
    if embed is None:
        raise ValueError(f"{where}: no embedding tensor ({' / '.join(EMBED_KEYS[:2])} / token_embd.weight)")
    if head is None:
        if not getattr(target_config(target), "tie_word_embeddings", False):
            raise ValueError(f"{where}: no lm_head tensor and the config does not tie embeddings")
        head = embed
    return embed, head
