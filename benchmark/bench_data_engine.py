"""Engine-backed data (`--engine vllm`) against the HF path, same rows, one run: stored tokens/s.

    flock /tmp/heavy.lock .venv-vllm/bin/python benchmark/bench_data_engine.py     # needs vLLM (make install-vllm)

EAGLE-3 (fused) data of the embedded SmolLM2 on the first ShareGPT rows, through the generator loop
itself (modules/data/generation.py generate_folder, as generate_data_fused_features.py runs it):
  prefill       dataset replies: HF one conversation per forward (the CPU default) vs the engine at
                each of --batches;
  self-distill  --replies greedy: HF SelfDistiller vs the engine (continuous batching, one capture
                request per finished conversation), each at every batch size of --batches.
tokens/s = stored tokens / seconds of generate_folder (target or engine already loaded; the engine's
start is reported apart). Also reports how many self-distilled conversations came out with the same
ids as HF greedy. Results: benchmark/results/data_engine.json.
"""
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from modules.data.chat import load_rows
from modules.export.engines import default_aux_layers
from modules.data.generation import GenerationSettings, generate_folder
from modules.data.storage import EagleDataset
from modules.io import atomic_write_text
from modules.settings import parse_settings, setting
from modules.target import embedded_converted, load_target_model, load_tokenizer, pick_dtype

# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag; --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    prefill_rows: int = setting(24, "dataset rows 0..N-1 for the prefill comparison")
    distill_rows: int = setting(8, "rows for the self-distillation comparison")
    max_length: int = setting(512, "tokens per conversation")
    max_new_tokens: int = setting(64, "tokens per reply")
    batches: list[int] = setting([1, 16], "batch sizes, each run on both paths (engine max_num_seqs; HF "
                                          "conversations generated together)", aliases=["--batch"])
    dtype: str = setting("fp32", "both paths (vLLM's CPU bf16 and PyTorch's differ in kernels; fp32 is the fair "
                                 "pair)")
    kv_cache_gib: float = setting(1.0, "engine KV cache in GiB")
    eager: bool = setting(True, "engine without torch.compile (its ~100 s compile would not pay off at this size)")
    out: str = setting("benchmark/results/data_engine.json", "results file")
# ----------------------------------------------------------------------------- end of SETTINGS


def engine_settings(args, batch: int):
    """The engine_* fields of the generator settings (modules/data/generation_cli.py GenerateSettings)."""
    return SimpleNamespace(engine_tensor_parallel=1, engine_pipeline_parallel=1, engine_gpu_memory=0.9,
                           engine_kv_cache_gib=args.kv_cache_gib, engine_max_seqs=batch,
                           engine_max_batched_tokens=max(8192, args.max_length + 1), engine_eager=args.eager)


def timed(target, tokenizer, rows, settings, folder) -> dict:
    start = time.perf_counter()
    m = generate_folder(target, tokenizer, rows, folder, settings, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "tokens": m["tokens"], "rows": m["rows_written"],
            "tokens_per_s": round(m["tokens"] / seconds, 1)}


def ids_by_row(folder) -> dict:
    ds = EagleDataset(folder, read_aux=False)
    return {int(it["row_id"]): it["input_ids"].tolist() for it in (ds[i] for i in range(len(ds)))}


def main(argv=None) -> int:
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    from modules.data.engine_vllm import VllmFeatureEngine

    tokenizer = load_tokenizer(None)
    model = load_target_model(None, dtype=args.dtype, device="cpu")
    dtype = pick_dtype(args.dtype, "cpu")
    aux = default_aux_layers(model.config.num_hidden_layers)
    n = max(args.prefill_rows, args.distill_rows)
    rows = load_rows("sharegpt", 0, n)
    base = dict(model=str(embedded_converted().name), dataset="sharegpt", start=0, max_length=args.max_length,
                store_dtype="bf16", aux_layers=aux, max_new_tokens=args.max_new_tokens)
    prefill = dict(base, end=args.prefill_rows)
    distill = dict(base, end=args.distill_rows, replies="greedy")
    settings = {**dataclasses.asdict(args), "threads": torch.get_num_threads(), "aux_layers": aux}
    results = {"settings": settings, "runs": {}}
    runs = results["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs["hf_prefill"] = timed(model, tokenizer, rows[:args.prefill_rows], GenerationSettings(**prefill),
                                   tmp / "hf_prefill")
        print("hf prefill", runs["hf_prefill"], flush=True)
        for batch in args.batches:
            runs[f"hf_greedy_b{batch}"] = timed(model, tokenizer, rows[:args.distill_rows],
                                                GenerationSettings(**distill, reply_batch_size=batch),
                                                tmp / f"hf_greedy_b{batch}")
            print(f"hf greedy batch {batch}", runs[f"hf_greedy_b{batch}"], flush=True)
        for batch in args.batches:
            start = time.perf_counter()
            engine_prefill = GenerationSettings(**prefill, engine="vllm")
            engine = VllmFeatureEngine(None, tokenizer, engine_prefill, dtype, engine_settings(args, batch))
            results[f"engine_start_b{batch}_s"] = round(time.perf_counter() - start, 1)
            runs[f"engine_prefill_b{batch}"] = timed(engine, tokenizer, rows[:args.prefill_rows], engine_prefill,
                                                     tmp / f"engine_prefill_b{batch}")
            print(f"engine prefill batch {batch}", runs[f"engine_prefill_b{batch}"], flush=True)
            engine.settings = engine_distill = GenerationSettings(**distill, engine="vllm")
            runs[f"engine_greedy_b{batch}"] = timed(engine, tokenizer, rows[:args.distill_rows], engine_distill,
                                                    tmp / f"engine_greedy_b{batch}")
            print(f"engine greedy batch {batch}", runs[f"engine_greedy_b{batch}"], flush=True)
            engine.close()
            del engine
        hf_ids = ids_by_row(tmp / f"hf_greedy_b{args.batches[0]}")  # the first batch size: the reference
        for batch in args.batches:
            ids = ids_by_row(tmp / f"engine_greedy_b{batch}")
            same = sum(ids.get(r) == v for r, v in hf_ids.items())
            results[f"same_ids_as_hf_greedy_b{batch}"] = f"{same}/{len(hf_ids)}"
    def best(prefix):
        return max(v["tokens_per_s"] for k, v in runs.items() if k.startswith(prefix))

    results["ratios"] = {
        "engine_prefill_vs_hf": round(best("engine_prefill") / runs["hf_prefill"]["tokens_per_s"], 2),
        "engine_greedy_vs_best_hf_greedy": round(best("engine_greedy") / best("hf_greedy"), 2)}
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
