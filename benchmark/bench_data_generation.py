"""Data-generation throughput and storage cost, side by side in one run.

    python benchmark/bench_data_generation.py            # embedded SmolLM2 on 12 ShareGPT rows

Prints target tokens/s of (a) a bare batched forward of the target over the same rows and batches
(no tokenising, no feature copies, no writing) and (b) the whole generate_data pipeline (chat
template + loss mask, forward, feature extraction, packed shards on disk); goal: (b) >= 90% of (a).
Also bytes on disk per token against hidden_size x 2 (goal: <= 5% overhead), and the bare forward
in fp32 vs bf16 and unbatched vs batched (what the CPU "auto" dtype and the batch size rest on).
"""
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.data.chat import load_rows
from modules.data.features import base_model
from modules.data.generation import (GenerationSettings, encode_rows, generate_folder, make_batches,
                                pad_batch, resolve_batch_tokens)
from modules.target import load_target_model, load_tokenizer, model_display_name, pick_dtype
from modules.settings import parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag; --config FILE reads them from a JSON/YAML file.
@dataclass
class DataBenchSettings:
    """The settings of both data benchmarks (benchmark/bench_data_self_distill.py subclasses it)."""
    model: str | None = setting(None, "target; None = embedded SmolLM2-135M-Instruct")
    dataset: str = setting("sharegpt", "dataset (as generate_data.py)")
    rows: int = setting(12, "dataset rows 0..ROWS-1")
    max_length: int = setting(2048, "tokens per conversation")
    dtype: str = setting("auto", "target dtype (auto: bf16 on GPU and on CPUs with bf16 units)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N")
    threads: int | None = setting(None, "torch CPU threads (None: torch's default); 1 avoids oversubscription on a "
                                        "busy box")


@dataclass
class Settings(DataBenchSettings):
    batch_tokens: int = setting(0, "padded tokens per forward; 0: the generator's auto choice for the device")
    compare_batch_tokens: int = setting(8192, "the batched alternative shown in the second table")
    dtype_rows: int = setting(4, "rows used for the fp32-vs-bf16 and unbatched comparisons (fp32 is slow on CPU)")
    repeats: int = setting(2, "bare and pipeline runs alternate this many times (a shared machine is noisy)")
# ----------------------------------------------------------------------------- end of SETTINGS


@torch.no_grad()
def bare_forward(model, examples, pad_id, batch_tokens) -> tuple[float, int]:
    """(seconds, real tokens) of the target's forward alone over length-sorted padded batches."""
    device = next(model.parameters()).device
    batches = [pad_batch(b, pad_id, device) for b in make_batches(examples, batch_tokens)]
    start = time.perf_counter()
    for input_ids, attention_mask in batches:
        base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, sum(len(ids) for _, ids, _ in examples)


def pipeline(model, tokenizer, rows, settings, out_dir) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = generate_folder(model, tokenizer, rows, out_dir, settings, progress=False)
    return time.perf_counter() - start, manifest


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.splitlines()[0])


def load(args):
    """(model, tokenizer, dataset rows, encoded examples); resolves args.batch_tokens for the device."""
    tokenizer = load_tokenizer(args.model)
    model = load_target_model(args.model, dtype=args.dtype, device=args.device)
    args.batch_tokens = resolve_batch_tokens(args.batch_tokens, next(model.parameters()).device)
    rows = load_rows(args.dataset, 0, args.rows)
    examples, skipped, _ = encode_rows(tokenizer, rows, args.max_length, None)
    print(f"target {model_display_name(args.model)} ({next(model.parameters()).dtype}, "
          f"{next(model.parameters()).device}, {torch.get_num_threads()} threads), rows 0-{args.rows}: "
          f"{len(examples)} kept, {sum(len(e[1]) for e in examples):,} tokens, max_length {args.max_length}, "
          f"batch_tokens {args.batch_tokens}")
    return model, tokenizer, rows, examples


def bare_vs_pipeline(args, model, tokenizer, rows, examples):
    """Print tokens/s of the bare forward against the whole pipeline, and bytes on disk per token."""
    pad = tokenizer.pad_token_id
    dtype = next(model.parameters()).dtype
    bare_forward(model, examples[:1], pad, args.batch_tokens)  # warm-up (allocator, kernels)
    settings = GenerationSettings(model=model_display_name(args.model), dataset=args.dataset, start=0,
                                  end=args.rows, max_length=args.max_length, batch_tokens=args.batch_tokens)
    # Bare and pipeline runs alternate so that load from other processes hits both alike; best of each.
    bare_times, pipe_times = [], []
    for r in range(args.repeats):
        t, n_tok = bare_forward(model, examples, pad, args.batch_tokens)
        bare_times.append(t)
        with tempfile.TemporaryDirectory() as tmp:
            t, manifest = pipeline(model, tokenizer, rows, settings, Path(tmp) / "data")
        pipe_times.append(t)
    assert manifest["tokens"] == n_tok
    bare_tps, pipe_tps = n_tok / min(bare_times), n_tok / min(pipe_times)
    feature_bytes = manifest["hidden_size"] * 2
    bytes_per_token = manifest["bytes"] / manifest["tokens"]
    print("\n| measure | bare forward | generate_data pipeline | ratio | goal |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| target tokens/s ({str(dtype).replace('torch.', '')}) | {bare_tps:,.0f} | {pipe_tps:,.0f} | "
          f"{pipe_tps / bare_tps:.1%} | >= 90% |")
    print(f"| bytes on disk per token | {feature_bytes} (hidden {manifest['hidden_size']} x 2) | "
          f"{bytes_per_token:,.1f} | +{bytes_per_token / feature_bytes - 1:.2%} | <= +5% |")
    print(f"(bare runs {', '.join(f'{t:.1f}' for t in bare_times)} s, pipeline runs "
          f"{', '.join(f'{t:.1f}' for t in pipe_times)} s; rows written "
          f"{manifest['rows_written']}, skipped {manifest['skipped']})")


def dtypes_and_batching(args, model, pad, examples):
    """What the defaults rest on: print the bare forward's tokens/s in fp32 vs bf16, and per batch size,
    on a few rows."""
    few = examples[:args.dtype_rows]
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    table = []
    for name in ("float32", "bfloat16"):
        m = model if getattr(torch, name) == dtype else load_target_model(args.model, dtype=name, device=str(device))
        bare_forward(m, few[:1], pad, 1)
        for bt in dict.fromkeys((args.batch_tokens, args.compare_batch_tokens)):
            t, n = bare_forward(m, few, pad, bt)
            label = "one conversation per forward" if bt == 1 else f"batch_tokens {bt}"
            table.append((f"bare forward {name}, {label}", n / t))
        del m
    print(f"\n| bare forward on {len(few)} rows ({sum(len(e[1]) for e in few):,} tokens) | tokens/s |")
    print("| --- | --- |")
    for name, tps in table:
        print(f"| {name} | {tps:,.0f} |")
    print(f"(CPU auto dtype picks {str(pick_dtype('auto', 'cpu')).replace('torch.', '')} on this machine)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, rows, examples = load(args)
    bare_vs_pipeline(args, model, tokenizer, rows, examples)
    dtypes_and_batching(args, model, tokenizer.pad_token_id, examples)
    return 0

if __name__ == "__main__":
    sys.exit(main())
