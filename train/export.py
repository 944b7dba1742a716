"""Export a trained draft checkpoint (EAGLE-1/2 or EAGLE-3) for SGLang, vLLM and the official EAGLE code.

    python train/export.py --checkpoint outputs/eagle2/checkpoint-400 --out outputs/eagle2/export

EAGLE-1/2: config.json + model.safetensors (SGLang `LlamaForCausalLMEagle`, vLLM `EagleLlamaForCausalLM`)
and pytorch_model.bin (official `eagle-llm` EaModel). EAGLE-3: config.json + model.safetensors (SGLang
`LlamaForCausalLMEagle3`, vLLM `Eagle3LlamaForCausalLM`). bf16 weights by default. Each engine's reading
of the files is in modules/export/engines.py; docs/serving.md has the serve commands. Refuses a draft whose keys
or shapes do not fit the target, or that no engine could serve as trained.
"""
import argparse
import sys

from modules.paths import DEFAULT_TRAIN_DIR

# ----------------------------------------------------------------------------- SETTINGS
CHECKPOINT = str(DEFAULT_TRAIN_DIR / "draft")   # a checkpoint-* folder or a previous export
OUT = str(DEFAULT_TRAIN_DIR / "export")
MODEL = None              # target; None = the draft config's target_model
DTYPE = "bf16"            # bf16 (what engines run) | keep (the training dtype) | fp16 | fp32
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=CHECKPOINT)
    p.add_argument("--out", default=OUT)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default=DTYPE)
    args = p.parse_args(argv)

    import torch
    from modules.draft.kinds import kind_of_folder
    from modules.export.eagle_export import ExportError
    from modules.target import TargetLoadError

    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        kind = kind_of_folder(args.checkpoint)  # EAGLE-1/2 or EAGLE-3 (modules/draft/kinds.py)
        out = kind.export(args.checkpoint, args.out, target=args.model, dtype=dtype)
        files = ", ".join(kind.export_files)
    except (ExportError, ValueError, TargetLoadError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} ({files})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
