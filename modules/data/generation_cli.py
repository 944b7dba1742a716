"""The command line of the data generators: their settings, defined once, and the run they start.

`GenerateSettings` holds every setting of generate_data.py; `FusedGenerateSettings` adds those of
generate_data_fused_features.py (the fused layers, regeneration). The same fields serve allocation.py
(which passes them to its workers) and train/train_eagle_ttt.py --online (its online fields, reused
with `like`). Each field is a flag, a --help line, a run_config.json entry and a --config key
(modules/settings.py). A new generator setting is one field here (e.g. an engine choice or its
pass-through settings: add them to GenerateSettings and read them in `run`); a script changes a default
by re-declaring the field in its own dataclass at its top.

`run(settings)` loads target, tokenizer and rows and calls the generator loop
(modules/data/generation.py, which knows nothing of flags).
"""
import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.data.generation import (GenerationError, GenerationSettings, check_reply_settings, finished_manifest,
                                     generate_folder, manifest_header, writable_folder)
from modules.paths import DEFAULT_DATA_DIR
from modules.settings import like, save_run_config, setting

OUTPUT_DIR_ALIASES = ["--outdir", "--out"]  # the older spellings of --output-dir


@dataclass
class GenerateSettings:
    model: str | None = setting(None, "target: hub id, local folder or .gguf file; None = embedded "
                                      "SmolLM2-135M-Instruct")
    dataset: str = setting("sharegpt", "sharegpt (embedded), ultrachat, a .json/.jsonl file or a hub dataset id")
    split: str | None = like(GenerationSettings, "split")
    start: int = setting(0, "first dataset row")
    end: int | None = setting(None, "end row, exclusive (None: to the end of the dataset)")
    output_dir: str = setting(str(DEFAULT_DATA_DIR), "output folder", aliases=OUTPUT_DIR_ALIASES)
    index: int | None = setting(None, "worker index: writes OUTPUT_DIR/part-<index:04d> (allocation.py sets it)")
    gpu_index: list[int] | None = setting(None, "indexes of the visible GPUs this process may use (with "
                                                "CUDA_VISIBLE_DEVICES=4,5 set, 0 = GPU 4)", nargs="*",
                                          aliases=["--gpu_index"])
    max_length: int = like(GenerationSettings, "max_length")
    target_dtype: str = setting("auto", "dtype the target runs in: auto (bf16 on GPU and on CPUs with bf16 units, "
                                        "else fp32), bf16, fp16, fp32", aliases=["--dtype"])
    store_dtype: str = like(GenerationSettings, "store_dtype")
    device: str = setting("auto", "auto (this process's GPU if any, cuda:LOCAL_RANK under torchrun), cpu, cuda, "
                                  "cuda:1, ... (modules/placement.py)")
    spread_target: bool = setting(False, "spread the target over every visible GPU (device_map=auto; for targets "
                                         "too large for one GPU)")
    threads: int | None = setting(None, "CPU threads for torch (allocation.py splits the cores)")
    batch_tokens: int = like(GenerationSettings, "batch_tokens")
    rows_per_shard: int = like(GenerationSettings, "rows_per_shard")
    shard_bytes: int = like(GenerationSettings, "shard_bytes")
    system_prompt: str | None = like(GenerationSettings, "system_prompt")
    chat_template: str | None = setting(None, "Jinja chat template file (for models without one)")
    no_progress: bool = setting(False, "no tqdm bar (logs of background workers)", action="store_true")
    replies: str = like(GenerationSettings, "replies")
    temperature: float = like(GenerationSettings, "temperature")
    max_new_tokens: int = like(GenerationSettings, "max_new_tokens")
    reply_batch_size: int = like(GenerationSettings, "reply_batch_size")
    seed: int = like(GenerationSettings, "seed")
    # the target as a vLLM engine (modules/data/engine_vllm.py, docs/data.md "Engine-backed data")
    engine: str = like(GenerationSettings, "engine")
    engine_tensor_parallel: int = setting(1, "--engine vllm: tensor parallel size (GPUs per engine)")
    engine_pipeline_parallel: int = setting(1, "--engine vllm: pipeline parallel size")
    engine_gpu_memory: float = setting(0.9, "--engine vllm: fraction of GPU memory the engine may use")
    engine_kv_cache_gib: float = setting(0.0, "--engine vllm: KV cache size in GiB (0: from --engine-gpu-memory on "
                                              "GPU, 2 GiB of RAM on CPU)")
    engine_max_seqs: int = setting(64, "--engine vllm: requests the engine runs together (its batch)")
    engine_max_batched_tokens: int = setting(8192, "--engine vllm: tokens per engine step (at least --max-length "
                                                   "+ 1)")
    engine_eager: bool = setting(False, "--engine vllm: no compilation / CUDA graphs (faster start, slower run)")


@dataclass
class FusedGenerateSettings(GenerateSettings):
    """generate_data_fused_features.py: the fused (EAGLE-3) layers and regeneration added."""
    aux_layers: list[int] | None = setting(None, "hidden_states ids of the fused layers (low mid high); None = "
                                                 "official [2, N//2, N-3]")
    regenerate: bool = setting(False, "replace every assistant reply by the target's own first (HF generate or a "
                                      "server, turn by turn), then a second pass computes the features")
    server_url: str | None = setting(None, "regenerate through this OpenAI-compatible server (SGLang, vLLM, "
                                           "llama-cpp) instead of local generate")
    server_model: str = setting("default", "model name sent to the server")
    regenerate_only: bool = setting(False, "write OUTPUT_DIR/regenerated-*.jsonl and stop (no target loaded with "
                                           "--server-url, no features); rerun without it for the features")


def out_folder(settings: GenerateSettings) -> Path:
    """OUTPUT_DIR, or OUTPUT_DIR/part-<index> for an allocation.py worker."""
    out = Path(settings.output_dir)
    return out / f"part-{settings.index:04d}" if settings.index is not None else out


def place_process(settings: GenerateSettings) -> None:
    """--gpu-index (visible GPUs) and --threads (CPU threads) for this process."""
    import torch

    from modules.placement import PlacementError, physical_gpus

    if settings.gpu_index:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpus(settings.gpu_index))
        except PlacementError as err:
            raise GenerationError(str(err)) from err
    if settings.threads:
        torch.set_num_threads(settings.threads)


def loop_settings(settings: GenerateSettings, end: int, aux_layers) -> GenerationSettings:
    """What the generator loop records and must match on resume: the command line's settings, the ones it
    passes through copied (those it declares with `like(GenerationSettings, ...)`), the others resolved
    (display names, the end row, the fused layer ids)."""
    from modules.data.chat import dataset_display_name
    from modules.target import model_display_name

    resolved = dict(model=model_display_name(settings.model), dataset=dataset_display_name(settings.dataset),
                    start=settings.start, end=end, aux_layers=aux_layers)
    passed = {f.name: getattr(settings, f.name) for f in dataclasses.fields(GenerationSettings)
              if f.name not in resolved}
    return GenerationSettings(**resolved, **passed)


def run(settings: GenerateSettings, aux_layers_fn=None, rows_fn=None, extra_manifest: dict | None = None,
        rows_only: bool = False) -> dict | None:
    """Load target, tokenizer and rows, generate, print a summary; return the manifest.

    aux_layers_fn(num_layers) -> list of ids turns on fused (EAGLE-3) features.
    rows_fn(rows, get_model, tokenizer, out_dir) -> rows replaces the rows before the features are
    computed (regeneration of the assistant replies); get_model() loads the target, only when rows_fn
    needs it (a server regenerating next to this process keeps its GPUs until then); rows_only stops after
    rows_fn (no target loaded unless rows_fn needed it, no features, returns None); extra_manifest adds
    manifest fields (they must match on resume, like every other setting).
    The settings are saved as OUTPUT_DIR/run_config.json: `--config` of that file reruns the run.
    """
    from modules.data.chat import dataset_display_name, load_rows
    from modules.placement import PlacementError, pick_device
    from modules.target import load_target_config, load_target_model, load_tokenizer

    place_process(settings)
    out_dir = out_folder(settings)
    rows = load_rows(settings.dataset, settings.start, settings.end, settings.split)
    if not rows:
        raise GenerationError(f"no rows in range start={settings.start} end={settings.end} "
                              f"of {dataset_display_name(settings.dataset)}")
    end = rows[-1][0] + 1 if settings.end is None else min(settings.end, rows[-1][0] + 1)
    tokenizer = load_tokenizer(settings.model, settings.chat_template)  # cheap checks before the model loads
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("the tokenizer has no chat template: pass --chat-template FILE (a Jinja template)")
    config = load_target_config(settings.model)
    n_layers = config.get_text_config().num_hidden_layers
    loop = loop_settings(settings, end, aux_layers_fn(n_layers) if aux_layers_fn else None)
    check_reply_settings(loop)
    t0 = time.perf_counter()
    # A finished folder (e.g. allocation.py rerun after one worker failed) exits without loading weights.
    try:
        device = pick_device(settings.device, settings.spread_target)
    except PlacementError as err:
        raise GenerationError(str(err)) from err
    header = manifest_header(loop, tokenizer, config, device, extra_manifest, out_dir)
    finished = finished_manifest(out_dir, header) if out_dir.is_dir() else None
    if finished is not None:
        print(f"{out_dir} is already complete for these settings: nothing to do")
        print_summary(out_dir, finished, time.perf_counter() - t0)
        return finished
    save_run_config(settings, writable_folder(out_dir))
    get_model = functools.cache(lambda: load_target_model(settings.model, dtype=settings.target_dtype,
                                                          device=settings.device, spread=settings.spread_target))
    if rows_fn is not None:
        rows = rows_fn(rows, get_model, tokenizer, out_dir)
        if rows_only:
            print(f"{out_dir}: {len(rows)} rows ready in {time.perf_counter() - t0:,.1f} s; no features computed")
            return None
    if settings.engine == "vllm":  # the engine replaces the HF target
        if rows_fn is not None:
            raise GenerationError("--engine vllm writes the target's replies itself: use --replies greedy|sampled "
                                  "instead of --regenerate")
        from modules.data.engine_vllm import VllmFeatureEngine  # its errors are GenerationErrors
        from modules.target import pick_dtype

        model = VllmFeatureEngine(settings.model, tokenizer, loop, pick_dtype(settings.target_dtype, device), settings)
    else:
        model = get_model()
    manifest = generate_folder(model, tokenizer, rows, out_dir, loop, progress=not settings.no_progress,
                               desc=f"rows {settings.start}-{end}", extra_manifest=extra_manifest)
    print_summary(out_dir, manifest, time.perf_counter() - t0)
    return manifest


def run_with_clear_errors(fn) -> int:
    """The scripts' known failures (bad model, dataset, out dir, template) end with one line and exit code 2."""
    from modules.data.chat import DatasetError
    from modules.data.loss_mask import TemplateError
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
    import torch

    tokens = max(m["tokens"], 1)
    bytes_per_value = torch.finfo(getattr(torch, m["dtype"])).bits // 8
    feature_bytes = m["hidden_size"] * bytes_per_value * (1 + len(m["aux_layers"] or []))
    print(f"{out_dir}: rows {m['start_row']}-{m['end_row']} written {m['rows_written']} "
          f"(truncated {m['truncated']}), skipped {sum(m['skipped'].values())} {m['skipped']}")
    print(f"  tokens {m['tokens']:,} trained {m['trained_tokens']:,}  shards {m['shards']}  "
          f"{m['bytes'] / 2**20:,.1f} MiB = {m['bytes'] / tokens:,.0f} B/token "
          f"(features {feature_bytes} B/token)  {seconds:,.1f} s this run, complete={m['complete']}")
