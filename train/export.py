"""Export a trained draft checkpoint of any registered kind for SGLang, vLLM and the official EAGLE code.

    python train/export.py --checkpoint outputs/eagle2/checkpoint-400 --output-dir outputs/eagle2/export
    python train/export.py --checkpoint outputs/eagle3/draft --output-dir outputs/eagle3/export --hybrid-lookup 2

EAGLE-1/2: config.json + model.safetensors (SGLang `LlamaForCausalLMEagle`, vLLM `EagleLlamaForCausalLM`)
and pytorch_model.bin (official `eagle-llm` EaModel). EAGLE-3: config.json + model.safetensors (SGLang
`LlamaForCausalLMEagle3`, vLLM `Eagle3LlamaForCausalLM`); P-EAGLE and DFlash: their kind's layout
(modules/draft/peagle_draft.py, dflash_draft.py). The folder's config.json names the kind
(modules/draft/kinds.py). bf16 weights by default. Each engine's reading
of the files is in modules/export/engines.py; docs/serving.md has the serve commands. Refuses a draft whose keys
or shapes do not fit the target, or that no engine could serve as trained, and, after writing, an export that
lacks a tensor its kind needs (modules/draft/export_check.py).
"""
import sys
from dataclasses import dataclass

from modules.paths import DEFAULT_TRAIN_DIR
from modules.settings import parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--output-dir DIR); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    checkpoint: str = setting(str(DEFAULT_TRAIN_DIR / "draft"), "a checkpoint-* folder or a previous export")
    output_dir: str = setting(str(DEFAULT_TRAIN_DIR / "export"), "folder to write the export to",
                              aliases=["--out", "--outdir"])
    model: str | None = setting(None, "target; None = the draft config's target_model")
    dtype: str = setting("bf16", "bf16 (what engines run) | keep (the training dtype) | fp16 | fp32",
                         choices=["keep", "bf16", "fp16", "fp32"])
    hybrid_lookup: int = setting(0, "N > 0: vLLM with this repo's plugin (make install-vllm) serves the export as the "
                                    "hybrid: a prompt-lookup match of >= N tokens replaces the draft's tokens "
                                    "(modules/decode/hybrid.py, docs/serving.md); 0 = the draft alone")
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None):
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])

    import json

    import torch
    from modules.decode.hybrid import HybridLookup
    from modules.draft.kinds import kind_of_folder
    from modules.export import engines
    from modules.io import atomic_write_text
    from modules.draft.eagle_draft import ExportError
    from modules.draft.export_check import check_export
    from modules.target import TargetLoadError

    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        kind = kind_of_folder(args.checkpoint)  # any registered kind (modules/draft/kinds.py)
        if args.hybrid_lookup:
            HybridLookup(1, args.hybrid_lookup)  # refuses a min_match the rule cannot use, before writing
        out = kind.export(args.checkpoint, args.output_dir, target=args.model, dtype=dtype)
        if args.hybrid_lookup:
            config = json.loads((out / "config.json").read_text()) | engines.hybrid_lookup_fields(args.hybrid_lookup)
            atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True))
        check_export(out)  # every tensor its kind and config need, nothing else (modules/draft/export_check.py)
        files = ", ".join(kind.export_files)
    except (ExportError, ValueError, TargetLoadError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} ({files})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
