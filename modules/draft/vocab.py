"""EAGLE-3 draft vocabulary: the most frequent trained target tokens, and the id mappings.

An EAGLE-3 draft predicts over a reduced vocabulary (official: 32k of Llama-3's 128k): its
lm_head is [N, h] instead of [V, h], which makes training and drafting cheaper. The N tokens
are the most frequent *trained* tokens (loss mask = 1) of the training data.

Mappings, in the official / SGLang format:
    d2t  int64 [N]  offsets, target id = draft id + d2t[draft id]
    t2d  bool  [V]  True where the target token is in the draft vocabulary
Draft ids are assigned in increasing target-id order, so d2t is non-negative.
"""
from pathlib import Path

import torch

DEFAULT_COVERAGE = 0.95


def count_tokens(pairs, vocab_size: int) -> torch.Tensor:
    """Counts [vocab_size] of the loss-masked tokens over (input_ids, loss_mask) pairs."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for input_ids, loss_mask in pairs:
        ids = torch.as_tensor(input_ids).reshape(-1).long()
        mask = torch.as_tensor(loss_mask).reshape(-1).bool()
        kept = ids[mask]
        if kept.numel() and int(kept.max()) >= vocab_size:
            raise ValueError(f"token id {int(kept.max())} is outside the target vocabulary ({vocab_size})")
        counts += torch.bincount(kept, minlength=vocab_size)
    return counts


def shard_token_pairs(data_dirs):
    """(input_ids, loss_mask) per shard of generated data, reading only those two tensors
    (the hidden states, 99% of the bytes, are never touched)."""
    from safetensors import SafetensorError, safe_open

    if isinstance(data_dirs, (str, Path)):
        data_dirs = [data_dirs]
    shards = []
    for d in map(Path, data_dirs):
        shards += sorted(d.glob("shard-*.safetensors")) + sorted(d.glob("*/shard-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.safetensors files under {', '.join(map(str, data_dirs))}")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                yield f.get_tensor("input_ids"), f.get_tensor("loss_mask")
        except (SafetensorError, OSError) as err:  # corrupt or foreign file, or a missing key: name it
            raise ValueError(f"{shard}: cannot read input_ids/loss_mask ({err})") from err


def select_draft_vocab(counts: torch.Tensor, size: int | None = None,
                       coverage: float = DEFAULT_COVERAGE, always_include=()):
    """Target ids of the draft vocabulary (sorted ascending) and the share of trained tokens
    they cover.

    size None: the smallest N whose N most frequent tokens cover >= `coverage` of the counts.
    size N: the N most frequent; when fewer than N tokens ever occur, the rest is filled with
    the lowest unused ids (the official code does the same) so the head keeps its shape.
    `always_include` (e.g. eos) are added first, so they count towards N.
    """
    counts = counts.long()
    vocab = counts.numel()
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no trained tokens counted: is the loss mask empty?")
    order = torch.argsort(counts, descending=True, stable=True)  # ties: lower id first
    forced = [int(t) for t in always_include if 0 <= int(t) < vocab]
    if size is None:
        need = coverage * total - float(sum(counts[forced]))
        rest = order[~torch.isin(order, torch.tensor(forced, dtype=torch.long))]
        cum = torch.cumsum(counts[rest], 0)
        n_rest = int(torch.searchsorted(cum.double(), torch.tensor(need, dtype=torch.double))) + 1 if need > 0 else 0
        chosen = forced + rest[:n_rest].tolist()
    else:
        if not 0 < size <= vocab:
            raise ValueError(f"draft vocab size {size} must be in 1..{vocab}")
        chosen = list(dict.fromkeys(forced + order.tolist()))[:size]
    ids = torch.tensor(sorted(set(chosen)), dtype=torch.long)
    covered = float(counts[ids].sum()) / total
    return ids, covered


def build_mappings(draft_ids: torch.Tensor, vocab_size: int):
    """(d2t int64 [N], t2d bool [V]) for draft ids sorted by target id."""
    draft_ids = draft_ids.long()
    if draft_ids.numel() > 1 and not bool((draft_ids[1:] > draft_ids[:-1]).all()):
        raise ValueError("draft ids must be sorted and unique")
    d2t = draft_ids - torch.arange(draft_ids.numel(), dtype=torch.long, device=draft_ids.device)
    t2d = torch.zeros(vocab_size, dtype=torch.bool, device=draft_ids.device)
    t2d[draft_ids] = True
    return d2t, t2d
