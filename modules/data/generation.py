"""The data-generation loop shared by generate_data.py and generate_data_fused_features.py.

rows -> (tokenise + loss mask) -> length-sorted padded batches -> target forward -> packed shards.
With --replies greedy|sampled the middle is self_distill.py instead: the target writes the replies and
the features come from the forwards that generate them (ids and mask still from the chat template).

Shards and batches: the row range is cut into fixed blocks of `rows_per_shard` rows, one shard each
(auto: shards of at most `shard_bytes` at max length). Forward batches are formed across shard
boundaries, over a window of consecutive blocks that holds BATCH_WINDOW full batches at max length
(`batch_window_shards`), so large targets with few rows per shard still fill `batch_tokens`.

Determinism and resume: a window's batches depend only on its own rows, so recomputing a window after
a kill gives exactly the bytes an uninterrupted run writes. Whole shards appear atomically; a rerun
skips the windows whose shards are all on disk and writes only the missing shards of the others.
"""
import argparse
import functools
import hashlib
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modules.data.chat import BadRow, row_to_messages
from modules.data.features import target_features
from modules.data.loss_mask import TemplateError, tokenize_conversation
from modules.data.storage import (FORMAT, MANIFEST, SHARD_RE, list_shards, read_manifest, read_shard_stats,
                             shard_name, write_manifest, write_shard)

SHARD_BYTES = 2**30  # default shard size bound: few files (and memory maps) for large targets, still easy to copy
# A batching window holds this many full batches of max-length rows: length-sorting a window's rows
# fills batch_tokens; a window's features wait in host memory until its shards are written.
BATCH_WINDOW = 8
# Seconds to pause after each shard: lets the tests kill a run between shards deterministically.
SHARD_DELAY = float(os.environ.get("EAGLE_DATA_SHARD_DELAY", "0"))


class GenerationError(RuntimeError):
    """A setting or out dir that makes generation impossible (one-line message for users)."""


@dataclass
class GenerationSettings:
    """Everything that determines the bytes written; a resumed run must use the same values."""
    model: str
    dataset: str
    start: int
    end: int
    max_length: int = 2048
    system_prompt: str | None = None
    dtype: str = "bfloat16"            # storage dtype of the features
    aux_layers: list[int] | None = None  # EAGLE-3 fused features (None for EAGLE-1/2 data)
    rows_per_shard: int = 0            # 0: auto, shards of at most shard_bytes at max_length
    shard_bytes: int = SHARD_BYTES     # the bound of auto rows_per_shard
    batch_tokens: int = 0              # padded tokens per forward (longest row x rows); 0: auto per device
    split: str | None = None
    replies: str = "dataset"           # dataset | greedy | sampled: who writes the assistant replies
    temperature: float = 0.8           # replies=sampled: sampling temperature
    max_new_tokens: int = 512          # replies=greedy|sampled: tokens per reply
    seed: int = 0                      # replies=sampled: per-row seeds derive from it
    reply_batch_size: int = 8          # replies=greedy|sampled: conversations generated together

    def replies_manifest(self) -> dict | None:
        """The manifest's `replies` entry: None for the dataset's own replies, else what fixes them."""
        if self.replies == "dataset":
            return None
        sampled = self.replies == "sampled"
        return {"mode": self.replies, "temperature": self.temperature if sampled else 0.0,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed if sampled else None,
                "batch_size": self.reply_batch_size}


REPLY_MODES = ("dataset", "greedy", "sampled")


def check_reply_settings(settings: GenerationSettings) -> None:
    """Clear errors for reply settings that cannot work (before any weights load)."""
    if settings.replies not in REPLY_MODES:
        raise GenerationError(f"--replies must be one of {', '.join(REPLY_MODES)}, got {settings.replies!r}")
    if settings.replies == "dataset":
        return
    if settings.replies == "sampled" and not settings.temperature > 0:
        raise GenerationError(f"--replies sampled needs --temperature > 0 (got {settings.temperature}); "
                              f"use --replies greedy for temperature 0")
    if settings.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1 with --replies {settings.replies}, "
                              f"got {settings.max_new_tokens}")
    if settings.reply_batch_size < 1:
        raise GenerationError(f"--regen-batch-size must be >= 1, got {settings.reply_batch_size}")


def auto_rows_per_shard(hidden_size: int, max_length: int, dtype: torch.dtype, n_aux: int = 0,
                        shard_bytes: int = SHARD_BYTES) -> int:
    """Rows per shard so that a shard of max-length rows stays within shard_bytes: per token the last
    hidden state and n_aux fused ones (hidden_size x dtype each), an int32 id and a uint8 mask."""
    bytes_per_token = hidden_size * torch.finfo(dtype).bits // 8 * (1 + n_aux) + 5
    return max(1, shard_bytes // (bytes_per_token * max_length))


def batch_window_shards(rows_per_shard: int, batch_tokens: int, max_length: int) -> int:
    """Consecutive shards whose rows are batched together: enough rows for BATCH_WINDOW full batches
    of max-length rows (one shard when a forward takes one conversation, as on CPU)."""
    rows = -(-BATCH_WINDOW * batch_tokens // max_length)
    return max(1, -(-rows // rows_per_shard))


def chat_template_sha256(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()


def encode_messages(tokenizer, messages: list[dict], max_length: int):
    """(ids, mask, truncated) of one conversation, or BadRow(reason) when it has nothing to train on
    or the template fails on it (a missing template is an error of the whole run)."""
    try:
        ids, mask, was_truncated = tokenize_conversation(tokenizer, messages, max_length)
    except TemplateError as err:
        if "no chat template" in str(err):
            raise
        raise BadRow("template_error") from None
    if not any(mask):
        raise BadRow("no_trained_tokens_after_truncation" if was_truncated else "no_trained_tokens")
    return ids, mask, was_truncated


def prompt_rows(rows, system_prompt: str | None):
    """(examples [(row_id, messages)], skipped Counter, 0) for rows whose replies are to be generated."""
    examples, skipped = [], Counter()
    for row_id, row in rows:
        try:
            examples.append((row_id, row_to_messages(row, system_prompt)))
        except BadRow as bad:
            skipped[bad.reason] += 1
    return examples, skipped, 0


def encode_rows(tokenizer, rows, max_length: int, system_prompt: str | None):
    """(examples [(row_id, ids, mask)], skipped Counter, truncated count) for raw dataset rows."""
    examples, skipped, truncated = [], Counter(), 0
    for row_id, row in rows:
        try:
            ids, mask, was_truncated = encode_messages(tokenizer, row_to_messages(row, system_prompt), max_length)
        except BadRow as bad:
            skipped[bad.reason] += 1
            continue
        truncated += was_truncated
        examples.append((row_id, ids, mask))
    return examples, skipped, truncated


# Padded tokens per forward when --batch-tokens is 0. On GPU, batching fills the device. On CPU it
# does not pay: a padded batch needs an explicit attention mask, which moves SDPA off its fast causal
# kernel, and padding is wasted work; benchmark/bench_data_generation.py measured one conversation
# per forward ~3x faster than 8192-token batches (benchmark/README.md). 1 = one conversation per forward.
AUTO_BATCH_TOKENS = {"cuda": 16384, "cpu": 1}


def resolve_batch_tokens(batch_tokens: int, device: torch.device) -> int:
    return batch_tokens or AUTO_BATCH_TOKENS.get(torch.device(device).type, 1)


def make_batches(examples, batch_tokens: int) -> list[list]:
    """Length-sorted groups whose padded size (rows x longest) stays within batch_tokens."""
    order = sorted(examples, key=lambda e: (-len(e[1]), e[0]))
    batches, current = [], []
    for ex in order:
        longest = len(current[0][1]) if current else len(ex[1])
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    return batches


def pad_batch(batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for _, ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for b, (_, ids, _) in enumerate(batch):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def features_for_examples(model, examples, pad_id: int, batch_tokens: int, store_dtype: torch.dtype,
                          aux_layers=None, on_batch=None) -> list[dict]:
    """Conversations ready for storage, in the order of `examples`; padded positions are dropped."""
    device = next(model.parameters()).device
    out = {}
    for batch in make_batches(examples, batch_tokens):
        input_ids, attention_mask = pad_batch(batch, pad_id, device)
        last, aux = target_features(model, input_ids, attention_mask, aux_layers)
        # One device->host copy per batch (not per conversation): a single sync on GPU.
        last = last.to("cpu", store_dtype)
        aux = aux.to("cpu", store_dtype) if aux is not None else None
        for b, (row_id, ids, mask) in enumerate(batch):
            n = len(ids)
            conv = {"row_id": row_id, "input_ids": torch.tensor(ids, dtype=torch.int32),
                    "loss_mask": torch.tensor(mask, dtype=torch.uint8), "hidden_states": last[b, :n]}
            if aux is not None:
                conv["aux_hidden_states"] = aux[b, :n]
            out[row_id] = conv
        if on_batch is not None:
            on_batch(sum(len(ids) for _, ids, _ in batch))
    return [out[row_id] for row_id, _, _ in examples]


def shard_blocks(start: int, end: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows_per_shard, end)) for a in range(start, end, rows_per_shard)]


RESUME_KEYS = ("model", "dataset", "split", "start_row", "end_row", "max_length", "system_prompt", "dtype",
               "aux_layers", "rows_per_shard", "batch_tokens", "chat_template_sha256", "regenerated", "replies")


def _check_resume(out_dir: Path, manifest: dict, blocks) -> dict:
    """Stats of the shards already on disk; errors if the folder holds other settings' data."""
    if not (out_dir / MANIFEST).exists():
        if any(SHARD_RE.match(p.name) for p in out_dir.iterdir()):
            raise GenerationError(f"{out_dir} holds shards but no manifest.json: use an empty --outdir")
        return {}
    old = read_manifest(out_dir)
    for key in RESUME_KEYS:
        if old.get(key) != manifest.get(key):
            raise GenerationError(f"{out_dir} holds data made with {key}={old.get(key)!r} (now {manifest.get(key)!r}):"
                                  f" rerun with the same settings to resume, or use another --outdir")
    expected = {shard_name(a, b) for a, b in blocks}
    done = {}
    for path in list_shards(out_dir):
        if path.name not in expected:
            raise GenerationError(f"unexpected shard {path} for rows {manifest['start_row']}-{manifest['end_row']}")
        done[path.name] = read_shard_stats(path)
    return done


STORE_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def manifest_header(settings: GenerationSettings, tokenizer, config, device, extra_manifest: dict | None = None,
                    out_dir: Path | None = None) -> dict:
    """The manifest fields fixed by the settings (everything a resumed run must match), from the
    target's config alone: no weights needed, so a finished folder can be recognised cheaply.
    With auto rows per shard, a folder begun with otherwise equal settings keeps its own rows per
    shard (begun under another --shard-bytes or an older default), so its shards stay valid."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    store_dtype = STORE_TORCH_DTYPES[settings.dtype]
    rps = settings.rows_per_shard or auto_rows_per_shard(hidden, settings.max_length, store_dtype,
                                                         len(settings.aux_layers or []), settings.shard_bytes)
    header = {
        "format": FORMAT, "model": settings.model, "dataset": settings.dataset, "split": settings.split,
        "chat_template_sha256": chat_template_sha256(tokenizer), "vocab_size": len(tokenizer),
        "start_row": settings.start, "end_row": settings.end, "hidden_size": hidden, "dtype": settings.dtype,
        "aux_layers": settings.aux_layers, "max_length": settings.max_length,
        "system_prompt": settings.system_prompt, "rows_per_shard": rps,
        "batch_tokens": resolve_batch_tokens(settings.batch_tokens, device),
        **(extra_manifest or {}),
    }
    if settings.replies != "dataset":  # absent for the dataset's replies: older folders still resume
        header["replies"] = settings.replies_manifest()
    if not settings.rows_per_shard and out_dir is not None and (Path(out_dir) / MANIFEST).is_file():
        try:
            old = read_manifest(out_dir)
        except Exception:
            return header  # _check_resume reports it
        if old.get("rows_per_shard") and all(old.get(k) == header.get(k) for k in RESUME_KEYS if k != "rows_per_shard"):
            header["rows_per_shard"] = old["rows_per_shard"]
    return header


def finished_manifest(out_dir: Path, header: dict) -> dict | None:
    """The manifest of a complete folder made with exactly these settings, else None."""
    try:
        old = read_manifest(out_dir)
    except Exception:
        return None
    same = all(old.get(k) == header.get(k) for k in RESUME_KEYS)
    done = sum(int(m.group(2)) - int(m.group(1)) for p in out_dir.iterdir() if (m := SHARD_RE.match(p.name)))
    return old if same and old.get("complete") and done == header["end_row"] - header["start_row"] else None


def generate_folder(model, tokenizer, rows, out_dir, settings: GenerationSettings, progress: bool = True,
                    desc: str = "generate", extra_manifest: dict | None = None) -> dict:
    """Write (or finish) one data folder for rows [settings.start, settings.end); return the manifest.
    settings.replies greedy|sampled: the target writes the replies and its features are kept from
    those very forwards (modules/data/self_distill.py) instead of a forward over the dataset's replies."""
    check_reply_settings(settings)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise GenerationError(f"cannot write to out dir {out_dir}: {err.strerror or err}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("the tokenizer has no chat template: pass --chat-template FILE (a Jinja template)")
    store_dtype = STORE_TORCH_DTYPES[settings.dtype]
    device = next(model.parameters()).device
    manifest = manifest_header(settings, tokenizer, model.config, device, extra_manifest, out_dir)
    manifest["target_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    batch_tokens, rps = manifest["batch_tokens"], manifest["rows_per_shard"]
    blocks = shard_blocks(settings.start, settings.end, rps)
    done = _check_resume(out_dir, manifest, blocks)
    _write_progress_manifest(out_dir, manifest, done, complete=len(done) == len(blocks))

    by_block = {}
    for row_id, row in rows:
        by_block.setdefault((row_id - settings.start) // rps, []).append((row_id, row))
    distill = None
    if settings.replies != "dataset":
        from modules.data.self_distill import SelfDistiller

        distill = SelfDistiller(model, tokenizer, settings.max_length, settings.replies, settings.temperature,
                                settings.max_new_tokens, settings.seed, settings.reply_batch_size,
                                settings.aux_layers)
        per_window = -(-settings.reply_batch_size // rps)  # enough shards for one batch of conversations
    else:
        per_window = batch_window_shards(rps, batch_tokens, settings.max_length)
    windows = [list(enumerate(blocks))[w:w + per_window] for w in range(0, len(blocks), per_window)]
    # a window with a missing shard is computed whole (its batches mix its shards' rows)
    todo = [win for win in windows if any(shard_name(a, b) not in done for _, (a, b) in win)]
    bar = tqdm(total=sum(b - a for win in todo for _, (a, b) in win if shard_name(a, b) not in done), unit="row",
               desc=desc, disable=not progress, dynamic_ncols=True)
    tokens_done, t0 = 0, time.perf_counter()

    def count_tokens(n):
        nonlocal tokens_done
        tokens_done += n
        bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}")

    def save(shards):
        for a, b, convs, skipped, truncated in shards:
            if shard_name(a, b) in done:
                continue  # written before a kill; recomputed only as part of its window
            done[shard_name(a, b)] = write_shard(out_dir, a, b, convs, dict(skipped), store_dtype, truncated)
            _write_progress_manifest(out_dir, manifest, done, complete=len(done) == len(blocks))
            bar.update(b - a)
            if SHARD_DELAY:
                time.sleep(SHARD_DELAY)

    def encode(win):
        """Per block of the window: (examples, skipped, truncated)."""
        if distill is not None:  # the replies are still to be written: (row_id, messages)
            return [prompt_rows(by_block.get(k, []), settings.system_prompt) for k, _ in win]
        return [encode_rows(tokenizer, by_block.get(k, []), settings.max_length, settings.system_prompt)
                for k, _ in win]

    def compute(examples):
        """Per example: a conversation ready for storage, or the reason it is skipped."""
        if distill is not None:
            return distill(examples, store_dtype, on_batch=count_tokens)
        return features_for_examples(model, examples, tokenizer.pad_token_id, batch_tokens, store_dtype,
                                     settings.aux_layers, on_batch=count_tokens)

    # Two helper threads keep the target busy: one tokenises the next window while the target runs
    # (matters on GPU with a small target), one writes the previous window's shards. At most one
    # window waits in memory, and shards land on disk in order.
    with ThreadPoolExecutor(max_workers=1) as writer, ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None
        next_encoded = encoder.submit(encode, todo[0]) if todo else None
        for i, win in enumerate(todo):
            encoded = next_encoded.result()
            if i + 1 < len(todo):
                next_encoded = encoder.submit(encode, todo[i + 1])
            examples = [ex for block_examples, _, _ in encoded for ex in block_examples]
            results = iter(compute(examples))
            shards = []
            for (_, (a, b)), (block_examples, skipped, truncated) in zip(win, encoded):
                convs, skipped = [], Counter(skipped)
                for conv in (next(results) for _ in block_examples):
                    if isinstance(conv, str):
                        skipped[conv] += 1
                    else:
                        truncated += conv.pop("truncated", False)
                        convs.append(conv)
                shards.append((a, b, convs, skipped, truncated))
            if pending is not None:
                pending.result()  # re-raises a write error (e.g. a full disk)
            pending = writer.submit(save, shards)
        if pending is not None:
            pending.result()
    bar.close()
    return read_manifest(out_dir)


def _write_progress_manifest(out_dir: Path, manifest: dict, done: dict, complete: bool) -> None:
    totals = {"rows_written": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0, "bytes": 0}
    skipped = Counter()
    for s in done.values():
        totals["rows_written"] += s["rows"]
        totals["tokens"] += s["tokens"]
        totals["trained_tokens"] += s["trained_tokens"]
        totals["truncated"] += s.get("truncated", 0)
        totals["bytes"] += s["bytes"]
        skipped.update(s["skipped"])
    write_manifest(out_dir, {**manifest, **totals, "skipped": dict(sorted(skipped.items())),
                             "shards": len(done), "complete": complete})


# ----------------------------------------------------------------------------- command line
# Shared by generate_data.py and generate_data_fused_features.py: each script passes its SETTINGS.

def add_generation_args(parser, defaults: dict):
    """Flags of the generator scripts; `defaults` holds the script's SETTINGS block (UPPER CASE keys)."""
    a = parser.add_argument
    a("--model", default=defaults["MODEL"], help="hub id, local folder, or .gguf file (default: embedded SmolLM2)")
    a("--dataset", default=defaults["DATASET"], help="sharegpt (embedded), ultrachat, a .json/.jsonl file or hub id")
    a("--split", default=None, help="dataset split for hub datasets (default: train, ultrachat: train_sft)")
    a("--start", type=int, default=defaults["START"], help="first dataset row")
    a("--end", type=int, default=defaults["END"], help="end row (exclusive; default: the whole dataset)")
    a("--index", type=int, default=None, help="worker index: writes OUTDIR/part-<index:04d> (allocation.py sets it)")
    a("--gpu_index", type=int, nargs="*", default=None,
      help="indexes of the visible GPUs this process may use (with CUDA_VISIBLE_DEVICES=4,5 set, 0 = GPU 4)")
    a("--outdir", default=defaults["OUTDIR"], help="output folder")
    a("--max-length", type=int, default=defaults["MAX_LENGTH"], help="truncate conversations to this many tokens")
    a("--dtype", default=defaults["DTYPE"], help="dtype the target runs in: auto, bf16, fp16, fp32")
    a("--store-dtype", default=defaults["STORE_DTYPE"], choices=["bf16", "fp16", "fp32"],
      help="dtype of stored features")
    a("--device", default=defaults["DEVICE"], help="auto (this process's GPU if any, cuda:LOCAL_RANK under torchrun), "
      "cpu, cuda, cuda:1, ... (modules/placement.py)")
    a("--spread-target", action=argparse.BooleanOptionalAction, default=defaults["SPREAD_TARGET"],
      help="spread the target over every visible GPU (device_map=auto; for targets too large for one GPU)")
    a("--threads", type=int, default=None, help="CPU threads for torch (allocation.py splits the cores)")
    a("--batch-tokens", type=int, default=defaults["BATCH_TOKENS"],
      help="padded tokens per forward (0: auto, 16384 on GPU, one conversation per forward on CPU)")
    a("--rows-per-shard", type=int, default=0, help="rows per shard file (0: auto, shards <= --shard-bytes)")
    a("--shard-bytes", type=int, default=defaults["SHARD_BYTES"],
      help="auto rows per shard keeps a shard of max-length rows within this many bytes")
    a("--system-prompt", default=defaults["SYSTEM_PROMPT"], help="system prompt for rows without one")
    a("--chat-template", default=None, help="Jinja chat template file (for models without one)")
    a("--no-progress", action="store_true", help="no tqdm bar (logs of background workers)")
    a("--replies", default=defaults["REPLIES"], choices=REPLY_MODES,
      help="who writes the assistant replies: dataset (as is), greedy or sampled (the target's own, "
           "features kept from the generating forwards; modules/data/self_distill.py)")
    a("--temperature", type=float, default=defaults["TEMPERATURE"],
      help="sampling temperature of --replies sampled (and of --regenerate)")
    a("--max-new-tokens", type=int, default=defaults["MAX_NEW_TOKENS"], help="tokens per generated reply")
    a("--regen-batch-size", type=int, default=defaults["REGEN_BATCH_SIZE"],
      help="conversations generated together (or requests in flight to a --server-url)")
    a("--seed", type=int, default=0, help="sampling seed (--replies sampled: per-row seeds derive from it)")
    return parser


STORE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def run_from_args(args, aux_layers_fn=None, rows_fn=None, extra_manifest: dict | None = None,
                  rows_only: bool = False) -> dict | None:
    """Load target, tokenizer and rows from parsed flags, generate, print a summary; return the manifest.

    aux_layers_fn(num_layers) -> list of ids turns on fused (EAGLE-3) features.
    rows_fn(rows, get_model, tokenizer, out_dir) -> rows replaces the rows before the features are
    computed (regeneration of the assistant replies); get_model() loads the target, only when rows_fn
    needs it (a server regenerating next to this process keeps its GPUs until then); rows_only stops after
    rows_fn (no target loaded unless rows_fn needed it, no features, returns None); extra_manifest adds manifest fields
    (they must match on resume, like every other setting).
    """
    from modules.data.chat import dataset_display_name, load_rows
    from modules.placement import PlacementError, physical_gpus, pick_device
    from modules.target import load_target_config, load_target_model, load_tokenizer, model_display_name

    if args.gpu_index:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpus(args.gpu_index))
        except PlacementError as err:
            raise GenerationError(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.outdir) / f"part-{args.index:04d}" if args.index is not None else Path(args.outdir)
    rows = load_rows(args.dataset, args.start, args.end, args.split)
    if not rows:
        raise GenerationError(f"no rows in range start={args.start} end={args.end} "
                              f"of {dataset_display_name(args.dataset)}")
    end = rows[-1][0] + 1 if args.end is None else min(args.end, rows[-1][0] + 1)
    tokenizer = load_tokenizer(args.model, args.chat_template)  # cheap checks before the model loads
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("the tokenizer has no chat template: pass --chat-template FILE (a Jinja template)")
    config = load_target_config(args.model)
    n_layers = config.get_text_config().num_hidden_layers
    settings = GenerationSettings(
        model=model_display_name(args.model), dataset=dataset_display_name(args.dataset), split=args.split,
        start=args.start, end=end, max_length=args.max_length, system_prompt=args.system_prompt,
        dtype=STORE_DTYPES[args.store_dtype], aux_layers=aux_layers_fn(n_layers) if aux_layers_fn else None,
        rows_per_shard=args.rows_per_shard, shard_bytes=args.shard_bytes, batch_tokens=args.batch_tokens,
        replies=args.replies, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        reply_batch_size=args.regen_batch_size)
    check_reply_settings(settings)
    t0 = time.perf_counter()
    # A finished folder (e.g. allocation.py rerun after one worker failed) exits without loading weights.
    try:
        device = pick_device(args.device, args.spread_target)
    except PlacementError as err:
        raise GenerationError(str(err)) from None
    header = manifest_header(settings, tokenizer, config, device, extra_manifest, out_dir)
    finished = finished_manifest(out_dir, header) if out_dir.is_dir() else None
    if finished is not None:
        print(f"{out_dir} is already complete for these settings: nothing to do")
        print_summary(out_dir, finished, time.perf_counter() - t0)
        return finished
    get_model = functools.cache(lambda: load_target_model(args.model, dtype=args.dtype, device=args.device,
                                                          spread=args.spread_target))
    if rows_fn is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = rows_fn(rows, get_model, tokenizer, out_dir)
        if rows_only:
            print(f"{out_dir}: {len(rows)} rows ready in {time.perf_counter() - t0:,.1f} s; no features computed")
            return None
    model = get_model()
    manifest = generate_folder(model, tokenizer, rows, out_dir, settings, progress=not args.no_progress,
                               desc=f"rows {args.start}-{end}", extra_manifest=extra_manifest)
    print_summary(out_dir, manifest, time.perf_counter() - t0)
    return manifest


def run_with_clear_errors(fn) -> int:
    """The scripts' known failures (bad model, dataset, out dir, template) end with one line and exit code 2."""
    from modules.data.chat import DatasetError
    from modules.data.storage import DataFormatError
    from modules.target import TargetLoadError

    try:
        fn()
    except (TargetLoadError, DatasetError, GenerationError, TemplateError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk while writing a shard (its temporary file is removed)
        print(f"error: {err.strerror or err}: {getattr(err, 'filename', '') or ''}", file=sys.stderr)
        return 2
    return 0


def print_summary(out_dir, m: dict, seconds: float) -> None:
    tokens = max(m["tokens"], 1)
    bytes_per_value = torch.finfo(getattr(torch, m["dtype"])).bits // 8
    feature_bytes = m["hidden_size"] * bytes_per_value * (1 + len(m["aux_layers"] or []))
    print(f"{out_dir}: rows {m['start_row']}-{m['end_row']} written {m['rows_written']} "
          f"(truncated {m['truncated']}), skipped {sum(m['skipped'].values())} {m['skipped']}")
    print(f"  tokens {m['tokens']:,} trained {m['trained_tokens']:,}  shards {m['shards']}  "
          f"{m['bytes'] / 2**20:,.1f} MiB = {m['bytes'] / tokens:,.0f} B/token "
          f"(features {feature_bytes} B/token)  {seconds:,.1f} s this run, complete={m['complete']}")
