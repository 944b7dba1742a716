"""The data-generation loop shared by generate_data.py and generate_data_fused_features.py (their
command line: modules/data/generation_cli.py).

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
import hashlib
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modules.data.chat import BadRow, row_to_messages
from modules.data.features import target_features
from modules.data.loss_mask import encode_messages
from modules.settings import setting
from modules.data.storage import (FORMAT, MANIFEST, SHARD_RE, DataFormatError, list_shards, read_manifest,
                                  read_shard_stats, shard_name, write_manifest, write_shard)
from modules.io import atomic_write_text
from modules.target_weights import text_config

SHARD_BYTES = 2**30  # default shard size bound: few files (and memory maps) for large targets, still easy to copy
# A batching window holds this many full batches of max-length rows: length-sorting a window's rows
# fills batch_tokens; a window's features wait in host memory until its shards are written.
BATCH_WINDOW = 8
# Seconds to pause after each shard: lets the tests kill a run between shards deterministically.
SHARD_DELAY = float(os.environ.get("EAGLE_DATA_SHARD_DELAY", "0"))
# OUTPUT_DIR/progress.json: rows done so far (allocation.py's bar reads it), rewritten at most this often.
PROGRESS = "progress.json"
PROGRESS_SECONDS = 1.0


class GenerationError(RuntimeError):
    """A setting or out dir that makes generation impossible (one-line message for users)."""


REPLY_MODES = ("dataset", "greedy", "sampled")
ENGINES = ("hf", "vllm")  # who runs the target (vllm: modules/data/engine_vllm.py)
STORE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --store-dtype -> the manifest's dtype


@dataclass
class GenerationSettings:
    """Everything that determines the bytes written; a resumed run must use the same values.

    The settings the command line passes through unchanged are declared here, once: the generators' command
    line (modules/data/generation_cli.GenerateSettings) takes them with `like`, and `loop_settings` copies them.
    model, dataset, end and aux_layers are the command line's, resolved (display names, the end row, layer ids)."""
    model: str
    dataset: str
    start: int
    end: int
    aux_layers: list[int] | None = None  # EAGLE-3 fused features (None for EAGLE-1/2 data)
    split: str | None = setting(None, "dataset split for hub datasets (None: train, ultrachat: train_sft)")
    max_length: int = setting(2048, "tokens per conversation (longer ones are truncated)")
    store_dtype: str = setting("bf16", "dtype of the stored features", choices=list(STORE_DTYPES))
    batch_tokens: int = setting(0, "padded tokens per forward, length-sorted batches (0: auto, 16384 on GPU, one "
                                   "conversation per forward on CPU: measured faster there, benchmark/README.md)")
    rows_per_shard: int = setting(0, "rows per shard file (0: auto, shards <= --shard-bytes)")
    shard_bytes: int = setting(SHARD_BYTES, "auto rows per shard keeps a shard of max-length rows within this many "
                                            "bytes")
    system_prompt: str | None = setting(None, "system prompt for rows without one (the original used Llama-2's)")
    replies: str = setting("dataset", "who writes the assistant replies: dataset (as is), greedy or sampled (the "
                                      "target's own, features kept from the generating forwards; "
                                      "modules/data/self_distill.py, docs/data.md)", choices=list(REPLY_MODES))
    temperature: float = setting(0.8, "sampling temperature of --replies sampled (and of --regenerate)")
    max_new_tokens: int = setting(512, "tokens per generated reply")
    reply_batch_size: int = setting(8, "conversations generated together (or requests in flight to a --server-url)",
                                    aliases=["--regen-batch-size"])
    seed: int = setting(0, "sampling seed (--replies sampled: per-row seeds derive from it)")
    engine: str = setting("hf", "who runs the target: hf (a Hugging Face forward in this process) or vllm (a vLLM "
                                "engine: prefill or self-distilled replies, same shards)", choices=list(ENGINES))

    @property
    def dtype(self) -> str:
        """The stored features' dtype as the manifest names it (bfloat16, float16, float32)."""
        return STORE_DTYPES[self.store_dtype]

    def replies_manifest(self) -> dict | None:
        """The manifest's `replies` entry: None for the dataset's own replies, else what fixes them."""
        if self.replies == "dataset":
            return None
        sampled = self.replies == "sampled"
        return {"mode": self.replies, "temperature": self.temperature if sampled else 0.0,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed if sampled else None,
                "batch_size": self.reply_batch_size}


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
    """Conversations ready for storage, in the order of `examples`; padded positions are dropped.
    on_batch(tokens, rows) after each forward."""
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
            on_batch(sum(len(ids) for _, ids, _ in batch), len(batch))
    return [out[row_id] for row_id, _, _ in examples]


def shard_blocks(start: int, end: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows_per_shard, end)) for a in range(start, end, rows_per_shard)]


RESUME_KEYS = ("model", "dataset", "split", "start_row", "end_row", "max_length", "system_prompt", "dtype",
               "aux_layers", "rows_per_shard", "batch_tokens", "chat_template_sha256", "regenerated", "replies",
               "engine")


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
    With auto rows per shard or auto batch tokens, a folder begun with otherwise equal settings keeps
    its own (begun under another --shard-bytes or an older default, e.g. the fused generator's former
    8192 batch tokens), so its shards stay valid and a resume writes the same bytes."""
    text = text_config(config)
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
    if settings.engine != "hf":  # absent for the HF path: older folders still resume
        header["engine"] = settings.engine
    auto = [key for key, value in (("rows_per_shard", settings.rows_per_shard),
                                   ("batch_tokens", settings.batch_tokens)) if not value]
    if auto and out_dir is not None and (Path(out_dir) / MANIFEST).is_file():
        try:
            old = read_manifest(out_dir)
        except DataFormatError:
            return header  # an unreadable manifest: _check_resume reads it again and raises this error
        if all(old.get(k) == header.get(k) for k in RESUME_KEYS if k not in auto):
            header.update({key: old[key] for key in auto if old.get(key)})
    return header


def finished_manifest(out_dir: Path, header: dict) -> dict | None:
    """The manifest of a complete folder made with exactly these settings, else None."""
    try:
        old = read_manifest(out_dir)
    except DataFormatError:
        return None  # not a finished folder: generate_folder reads it again and reports the error
    same = all(old.get(k) == header.get(k) for k in RESUME_KEYS)
    done = sum(int(m.group(2)) - int(m.group(1)) for p in out_dir.iterdir() if (m := SHARD_RE.match(p.name)))
    return old if same and old.get("complete") and done == header["end_row"] - header["start_row"] else None


def writable_folder(out_dir) -> Path:
    """out_dir, created; a clear error when it cannot be written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise GenerationError(f"cannot write to out dir {out_dir}: {err.strerror or err}") from err
    return out_dir


def generate_folder(model, tokenizer, rows, out_dir, settings: GenerationSettings, progress: bool = True,
                    desc: str = "generate", extra_manifest: dict | None = None) -> dict:
    """Write (or finish) one data folder for rows [settings.start, settings.end); return the manifest.
    settings.replies greedy|sampled: the target writes the replies and its features are kept from
    those very forwards (modules/data/self_distill.py) instead of a forward over the dataset's replies."""
    check_reply_settings(settings)
    out_dir = writable_folder(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("the tokenizer has no chat template: pass --chat-template FILE (a Jinja template)")
    # model: the HF target, or with settings.engine vllm the engine (engine_vllm.VllmFeatureEngine)
    device, dtype = (model.device, model.dtype) if settings.engine != "hf" else (
        next(model.parameters()).device, next(model.parameters()).dtype)
    manifest = manifest_header(settings, tokenizer, model.config, device, extra_manifest, out_dir)
    manifest["target_dtype"] = str(dtype).replace("torch.", "")
    job = FolderJob(model, tokenizer, rows, out_dir, settings, manifest)
    todo = job.windows_to_do()
    job.start_progress(sum(job.rows_missing(win) for win in todo), desc, progress)
    run_windows(job, todo)
    job.bar.close()
    return read_manifest(out_dir)


class FolderJob:
    """One data folder being written: its shard blocks, the shards already on disk, and the three steps
    of a window of blocks (encode its rows, compute their features, save its shards)."""

    def __init__(self, model, tokenizer, rows, out_dir: Path, settings: GenerationSettings, manifest: dict):
        self.model, self.tokenizer, self.out_dir, self.settings, self.manifest = (model, tokenizer, out_dir,
                                                                                  settings, manifest)
        self.store_dtype = STORE_TORCH_DTYPES[settings.dtype]
        self.batch_tokens, self.rows_per_shard = manifest["batch_tokens"], manifest["rows_per_shard"]
        self.blocks = shard_blocks(settings.start, settings.end, self.rows_per_shard)
        self.done = _check_resume(out_dir, manifest, self.blocks)
        self.write_manifest()
        self.by_block = {}
        for row_id, row in rows:
            self.by_block.setdefault((row_id - settings.start) // self.rows_per_shard, []).append((row_id, row))
        self.distill = None
        self.engine = model if settings.engine != "hf" else None  # computes both reply modes itself
        if settings.replies != "dataset" and self.engine is None:
            from modules.data.self_distill import SelfDistiller

            self.distill = SelfDistiller(model, tokenizer, settings.max_length, settings.replies, settings.temperature,
                                         settings.max_new_tokens, settings.seed, settings.reply_batch_size,
                                         settings.aux_layers)
        self.bar = None
        self.tokens_done, self.t0 = 0, time.perf_counter()
        self.rows_computing = 0  # rows of the window being computed whose features are done
        self.rows_shown = 0      # what the bar and progress.json show: it never goes back
        self.progress_lock, self.progress_written = threading.Lock(), 0.0

    def write_manifest(self):
        _write_progress_manifest(self.out_dir, self.manifest, self.done, complete=len(self.done) == len(self.blocks))

    def windows_to_do(self) -> list[list]:
        """Windows of consecutive (block index, (first row, end row)) with a missing shard: a window is
        computed whole (its batches mix its shards' rows)."""
        if self.engine is not None:  # enough shards to keep the engine's batch full
            per_window = -(-self.engine.window_rows // self.rows_per_shard)
        elif self.distill is not None:  # enough shards for one batch of conversations
            per_window = -(-self.settings.reply_batch_size // self.rows_per_shard)
        else:
            per_window = batch_window_shards(self.rows_per_shard, self.batch_tokens, self.settings.max_length)
        blocks = list(enumerate(self.blocks))
        windows = [blocks[w:w + per_window] for w in range(0, len(blocks), per_window)]
        return [win for win in windows if self.rows_missing(win)]

    def rows_missing(self, window) -> int:
        return sum(b - a for _, (a, b) in window if shard_name(a, b) not in self.done)

    def start_progress(self, total: int, desc: str, progress: bool):
        self.bar = tqdm(total=total, unit="row", desc=desc, disable=not progress, dynamic_ncols=True)
        self.rows_before = self.rows_on_disk()
        self.show_progress(force=True)

    def rows_on_disk(self) -> int:
        return sum(int(m.group(2)) - int(m.group(1)) for name in self.done if (m := SHARD_RE.match(name)))

    def show_progress(self, force=False):
        """The bar and OUTPUT_DIR/progress.json ({"rows_done", "rows_total"}: rows of the shards on disk plus
        those computed in the window at work; allocation.py reads it) move with the rows, not only per shard."""
        with self.progress_lock:
            done = self.rows_shown = max(self.rows_shown, self.rows_on_disk() + self.rows_computing)
            self.bar.n = done - self.rows_before
            self.bar.set_postfix(tok_s=f"{self.tokens_done / max(time.perf_counter() - self.t0, 1e-9):.0f}",
                                 refresh=False)
            self.bar.refresh()
            if force or time.perf_counter() - self.progress_written >= PROGRESS_SECONDS:
                total = self.settings.end - self.settings.start
                atomic_write_text(self.out_dir / PROGRESS, json.dumps({"rows_done": min(done, total),
                                                                        "rows_total": total}))
                self.progress_written = time.perf_counter()

    def count_tokens(self, tokens: int, rows: int = 0):
        """on_batch of the feature loops: tokens (and, when the loop reports them, rows) just computed."""
        self.tokens_done += tokens
        self.rows_computing += rows
        self.show_progress()

    def encode(self, window) -> list[tuple]:
        """Per block of the window: (examples, skipped, truncated)."""
        s = self.settings
        if s.replies != "dataset":  # the replies are still to be written: (row_id, messages)
            return [prompt_rows(self.by_block.get(k, []), s.system_prompt) for k, _ in window]
        return [encode_rows(self.tokenizer, self.by_block.get(k, []), s.max_length, s.system_prompt)
                for k, _ in window]

    def compute(self, examples) -> list:
        """Per example: a conversation ready for storage, or the reason it is skipped."""
        if self.engine is not None:
            return self.engine(examples, self.store_dtype, on_batch=self.count_tokens)
        if self.distill is not None:
            return self.distill(examples, self.store_dtype, on_batch=self.count_tokens)
        return features_for_examples(self.model, examples, self.tokenizer.pad_token_id, self.batch_tokens,
                                     self.store_dtype, self.settings.aux_layers, on_batch=self.count_tokens)

    def shards_of(self, window, encoded) -> list[tuple]:
        """(first row, end row, conversations, skipped, truncated) per block of a window, its features computed."""
        examples = [ex for block_examples, _, _ in encoded for ex in block_examples]
        results = iter(self.compute(examples))
        with self.progress_lock:  # from now on these rows count once their shards are on disk, not twice
            self.rows_computing = 0
        shards = []
        for (_, (a, b)), (block_examples, skipped, truncated) in zip(window, encoded):
            convs, skipped = [], Counter(skipped)
            for conv in (next(results) for _ in block_examples):
                if isinstance(conv, str):
                    skipped[conv] += 1
                else:
                    truncated += conv.pop("truncated", False)
                    convs.append(conv)
            shards.append((a, b, convs, skipped, truncated))
        return shards

    def save(self, shards):
        for a, b, convs, skipped, truncated in shards:
            if shard_name(a, b) in self.done:
                continue  # written before a kill; recomputed only as part of its window
            stats = write_shard(self.out_dir, a, b, convs, dict(skipped), self.store_dtype, truncated)
            with self.progress_lock:  # show_progress reads `done` from the computing thread
                self.done[shard_name(a, b)] = stats
            self.write_manifest()
            self.show_progress(force=True)
            if SHARD_DELAY:
                time.sleep(SHARD_DELAY)


def run_windows(job: FolderJob, todo: list) -> None:
    """Two helper threads keep the target busy: one tokenises the next window while the target runs
    (matters on GPU with a small target), one writes the previous window's shards. At most one
    window waits in memory, and shards land on disk in order."""
    with ThreadPoolExecutor(max_workers=1) as writer, ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None
        next_encoded = encoder.submit(job.encode, todo[0]) if todo else None
        for i, window in enumerate(todo):
            encoded = next_encoded.result()
            if i + 1 < len(todo):
                next_encoded = encoder.submit(job.encode, todo[i + 1])
            shards = job.shards_of(window, encoded)
            if pending is not None:
                pending.result()  # re-raises a write error (e.g. a full disk)
            pending = writer.submit(job.save, shards)
        if pending is not None:
            pending.result()


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
