"""Chat dataset -> EAGLE-3 training data: token ids, loss mask, the target's last hidden state AND
the fused low/middle/high-layer hidden states (`aux_hidden_states`, [tokens, 3 x hidden]).

    python generate_data_fused_features.py                       # embedded SmolLM2 on embedded ShareGPT
    python generate_data_fused_features.py --aux-layers 2 16 29  # choose the fused layers
    python generate_data_fused_features.py --replies greedy      # self-distilled: the target's own replies,
                                                                 # features kept while they are generated
    python generate_data_fused_features.py --regenerate          # the target's own replies (T=0.8) first
    python generate_data_fused_features.py --regenerate --server-url http://localhost:30000/v1 --regenerate-only
    python generate_data_fused_features.py --regenerate --server-url http://localhost:30000/v1  # server stopped
    python allocation.py --script generate_data_fused_features.py --outdir data_out/eagle3

Same storage, manifest, resume and allocation.py sharding as generate_data.py (modules/data/generation.py);
only the aux layers (default: the official EAGLE-3 choice, inputs of layers 2, N//2, N-3) and the
optional regeneration are added. Regenerated conversations are kept in OUTDIR/regenerated-*.jsonl,
so a killed run resumes with the same replies. With --server-url the target is loaded only after the
server has written every reply; --regenerate-only stops there, so the server can have the GPUs to
itself, and the same command without it then computes the features from the kept replies.
"""
import argparse
import sys

from modules.paths import DEFAULT_FUSED_DATA_DIR

# ----------------------------------------------------------------------------- SETTINGS
MODEL = None              # hub id, local folder or .gguf file; None = embedded SmolLM2-135M-Instruct
DATASET = "sharegpt"      # sharegpt (embedded), ultrachat, a .json/.jsonl file, or a hub dataset id
START = 0
END = None
MAX_LENGTH = 2048
DTYPE = "auto"
STORE_DTYPE = "bf16"
BATCH_TOKENS = 8192
SYSTEM_PROMPT = None
SHARD_BYTES = 2**30       # auto rows per shard: a shard of max-length rows stays within this many bytes
OUTDIR = str(DEFAULT_FUSED_DATA_DIR)
DEVICE = "auto"           # auto: this process's GPU (cuda:LOCAL_RANK under torchrun) or cpu; cpu, cuda:N
SPREAD_TARGET = False     # spread the target over every visible GPU (targets too large for one GPU)
AUX_LAYERS = None         # hidden_states ids of the fused layers; None = [2, N//2, N-3]
REPLIES = "dataset"       # dataset: the rows' replies; greedy / sampled: the target's own, written while
                          # its features are kept, in one pass (modules/data/self_distill.py; docs/data.md)
REGENERATE = False        # replace every assistant reply by the target's own first (HF generate or a
                          # server), then a second pass computes the features
TEMPERATURE = 0.8         # sampling temperature of --replies sampled and of --regenerate
MAX_NEW_TOKENS = 512      # per generated reply
REGEN_BATCH_SIZE = 8      # conversations generated together (or requests in flight to a server)
SERVER_URL = None         # an OpenAI-compatible server (SGLang, vLLM, llama-cpp) instead of local generate
SERVER_MODEL = "default"  # the model name the server expects
REGENERATE_ONLY = False   # write the regenerated replies and stop (no target loaded with SERVER_URL, no features)
# ----------------------------------------------------------------------------- end of SETTINGS


def add_fused_args(parser):
    a = parser.add_argument
    a("--aux-layers", type=int, nargs="+", default=AUX_LAYERS, help="hidden_states ids to fuse (default: official)")
    a("--regenerate", action=argparse.BooleanOptionalAction, default=REGENERATE,
      help="replace assistant replies with the target's own (turn by turn)")
    a("--server-url", default=SERVER_URL, help="regenerate through this OpenAI-compatible server")
    a("--server-model", default=SERVER_MODEL, help="model name sent to the server")
    a("--regenerate-only", action=argparse.BooleanOptionalAction, default=REGENERATE_ONLY,
      help="write OUTDIR/regenerated-*.jsonl and stop; rerun without it for the features")
    return parser


def regenerate_rows_fn(args):
    """rows_fn for modules.data.generation.run_from_args: regenerate (cached) before the features are computed.
    With --server-url the target is not loaded until the server has written every reply."""
    from pathlib import Path

    from modules.data.regenerate import LocalGenerator, OpenAIGenerator, regenerate_cached

    def rows_fn(rows, get_model, tokenizer, out_dir):
        if args.server_url:
            gen = OpenAIGenerator(args.server_url, args.server_model, args.temperature, args.max_new_tokens,
                                  concurrency=args.regen_batch_size)
        else:
            gen = LocalGenerator(get_model(), tokenizer, args.temperature, args.max_new_tokens, args.max_length,
                                 args.seed)
        cache = Path(out_dir) / f"regenerated-{args.start:08d}-{args.end if args.end is not None else 'end'}.jsonl"
        return regenerate_cached(rows, gen, cache, args.system_prompt, args.regen_batch_size,
                                 progress=not args.no_progress)

    return rows_fn


def main(argv=None) -> int:
    from modules.data.features import default_aux_layers
    from modules.data.generation import add_generation_args, run_from_args, run_with_clear_errors

    parser = add_generation_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), globals())
    parser = add_fused_args(parser)
    args = parser.parse_args(argv)

    def aux_layers_fn(num_layers):
        return list(args.aux_layers) if args.aux_layers else default_aux_layers(num_layers)

    kwargs = {"aux_layers_fn": aux_layers_fn}
    if args.regenerate_only and not args.regenerate:
        print("error: --regenerate-only needs --regenerate", file=sys.stderr)
        return 2
    if args.regenerate and args.replies != "dataset":
        print(f"error: --regenerate and --replies {args.replies} both replace the dataset's replies: use one "
              f"(--replies {args.replies} keeps the features while generating, no second pass)", file=sys.stderr)
        return 2
    if args.regenerate:
        kwargs["rows_fn"] = regenerate_rows_fn(args)
        # recorded in the manifest (a resume must use the same settings)
        kwargs["extra_manifest"] = {"regenerated": {
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "server_url": args.server_url, "server_model": args.server_model if args.server_url else None}}
        kwargs["rows_only"] = args.regenerate_only
    from modules.data.regenerate import RegenerationError
    try:
        return run_with_clear_errors(lambda: run_from_args(args, **kwargs))
    except RegenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
