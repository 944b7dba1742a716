"""Serve the target's features from a vLLM engine to online training (train_eagle_ttt.py --online --engine vllm).

    python serve_features.py                                   # embedded SmolLM2 (converted copy) on 127.0.0.1:8765
    python serve_features.py --model meta-llama/Llama-3.1-70B-Instruct --engine-tensor-parallel 8 --host 0.0.0.0
    torchrun --nproc_per_node 8 train/train_eagle_ttt.py --online --engine vllm --engine-url http://HOST:8765 ...

The engine (modules/data/engine_vllm.py) captures the EAGLE-3 aux layers and the final-norm last feature of
each token list it gets; trainer ranks send their batches' token ids and get the features back
(modules/data/feature_server.py: the protocol). The trainer starts this script itself when --engine-url is not
given; start it by hand to run the engine on other GPUs or another machine. It prints one "ready" line once the
engine is loaded, and stops on SIGTERM or Ctrl-C.
"""
import sys
from dataclasses import dataclass

from modules.data.feature_server import FeatureServerSettings, serve
from modules.data.generation_cli import run_with_clear_errors
from modules.settings import parse_settings


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--port 9000). The target and engine settings (--model, --aux-layers,
# --max-length, --target-dtype, --engine-tensor-parallel, ...) are the generators' (modules/data/generation_cli.py),
# gathered with --host and --port in FeatureServerSettings (modules/data/feature_server.py); re-declare one here to
# change its default.
@dataclass
class Settings(FeatureServerSettings):
    pass
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None) -> int:
    settings = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    return run_with_clear_errors(lambda: serve(settings))


if __name__ == "__main__":
    sys.exit(main())
