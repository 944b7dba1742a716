"""Chat dataset -> EAGLE training data: token ids, loss mask and the target's last hidden state.

    python generate_data.py                                  # embedded SmolLM2 on embedded ShareGPT
    python generate_data.py --model meta-llama/Llama-3.1-8B-Instruct --dataset ultrachat --end 20000
    python generate_data.py --replies greedy --max-new-tokens 512   # self-distilled: the target's own replies
    python generate_data.py --config data_out/eagle2/run_config.json  # the same run again (flags override it)

Writes OUTPUT_DIR/manifest.json + shard-*.safetensors (format: docs/data.md) and run_config.json (every
setting). Rerunning the same command after a kill resumes and ends with exactly the data of an
uninterrupted run.
"""
import sys
from dataclasses import dataclass

from modules.data.generation_cli import GenerateSettings, run, run_with_clear_errors
from modules.paths import DEFAULT_DATA_DIR
from modules.settings import like, parse_settings


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--max-length 1024). Every setting of the generators (--model,
# --dataset, --start, --end, --target-dtype, --batch-tokens, --replies, ...) is a field of GenerateSettings
# in modules/data/generation_cli.py, with its default and help; re-declare one here to change its default.
@dataclass
class Settings(GenerateSettings):
    output_dir: str = like(GenerateSettings, "output_dir", default=str(DEFAULT_DATA_DIR))
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None) -> int:
    settings = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    return run_with_clear_errors(lambda: run(settings))


if __name__ == "__main__":
    sys.exit(main())
