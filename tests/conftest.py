"""Shared pytest setup: tests import `modules` from the repo root and never touch the network.
Where a new test goes and how tests import their helpers: tests/README.md."""
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# No hub access in tests: every model is built locally or comes from an embedded package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as (model, tokenizer), fp32 on CPU, loaded once per session.

    Shared by every test that needs real-model behaviour; do not modify the model in place.
    """
    from modules.target import load_target

    return load_target(None, dtype="fp32", device="cpu")
