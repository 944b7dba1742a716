"""Chat dataset -> EAGLE training data: token ids, loss mask and the target's last hidden state.

    python generate_data.py                                  # embedded SmolLM2 on embedded ShareGPT
    python generate_data.py --model meta-llama/Llama-3.1-8B-Instruct --dataset ultrachat --end 20000
    python generate_data.py --replies greedy --max-new-tokens 512   # self-distilled: the target's own replies

Writes OUTDIR/manifest.json + shard-*.safetensors (format: docs/data.md). Rerunning the
same command after a kill resumes and ends with exactly the data of an uninterrupted run.
"""
import argparse
import sys

from modules.paths import DEFAULT_DATA_DIR

# ----------------------------------------------------------------------------- SETTINGS
MODEL = None              # hub id, local folder or .gguf file; None = embedded SmolLM2-135M-Instruct
DATASET = "sharegpt"      # sharegpt (embedded), ultrachat, a .json/.jsonl file, or a hub dataset id
START = 0                 # first dataset row
END = None                # end row, exclusive (None = to the end of the dataset)
MAX_LENGTH = 2048         # tokens per conversation (longer ones are truncated)
DTYPE = "auto"            # target compute dtype: bf16 on GPU and on CPUs with bf16 units, else fp32
STORE_DTYPE = "bf16"      # stored features: bf16 (default), fp16 or fp32
BATCH_TOKENS = 0          # padded tokens per forward (length-sorted batches); 0 = auto: 16384 on GPU,
                          # one conversation per forward on CPU (measured faster there: benchmark/README.md)
SYSTEM_PROMPT = None      # prepended to rows without a system turn (the original used Llama-2's)
SHARD_BYTES = 2**30       # auto rows per shard: a shard of max-length rows stays within this many bytes
OUTDIR = str(DEFAULT_DATA_DIR)
DEVICE = "auto"           # auto: this process's GPU (cuda:LOCAL_RANK under torchrun) or cpu; cpu, cuda:N
SPREAD_TARGET = False     # spread the target over every visible GPU (targets too large for one GPU)
REPLIES = "dataset"       # dataset: the rows' replies; greedy / sampled: the target's own, written while
                          # its features are kept (modules/data/self_distill.py; docs/data.md)
TEMPERATURE = 0.8         # --replies sampled
MAX_NEW_TOKENS = 512      # per generated reply
REGEN_BATCH_SIZE = 8      # conversations generated together
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None) -> int:
    from modules.data.generation import add_generation_args, run_from_args, run_with_clear_errors

    parser = add_generation_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), globals())
    args = parser.parse_args(argv)
    return run_with_clear_errors(lambda: run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
