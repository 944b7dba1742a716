"""Write a target model as a standard Hugging Face folder that vLLM and SGLang serve.

    python convert_target.py     # the embedded SmolLM2 GGUF -> targets/smollm2-135m-instruct
    python convert_target.py --model some/model.gguf --output-dir targets/mine

A hub model or a local HF folder needs no conversion: give it to the engine as it is. A GGUF file
(the embedded default is one) becomes config.json (with `architectures`) + model.safetensors (fp32,
the tied embedding under `model.embed_tokens.weight`) + the tokenizer files: the folder to pass to
`vllm serve` / `python -m sglang.launch_server` as the target next to an exported draft.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from modules.paths import EMBEDDED_MODEL_NAME, REPO_ROOT
from modules.settings import parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--output-dir DIR); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    model: str | None = setting(None, "GGUF file or model; None = the embedded SmolLM2-135M-Instruct")
    output_dir: str = setting(str(REPO_ROOT / "targets" / EMBEDDED_MODEL_NAME),
                              "folder to write (must not exist or be empty)", aliases=["--out", "--outdir"])
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None):
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])

    from modules.target import TargetLoadError, convert_to_hf

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty (remove it or choose another --output-dir)", file=sys.stderr)
        return 2
    if out.exists():
        out.rmdir()
    try:
        convert_to_hf(args.model, out)
    except (TargetLoadError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (config.json, model.safetensors, tokenizer): serve it as the target model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
