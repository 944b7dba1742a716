"""Chat dataset -> EAGLE-3 training data: token ids, loss mask, the target's last hidden state AND
the fused low/middle/high-layer hidden states (`aux_hidden_states`, [tokens, 3 x hidden]).

    python generate_data_fused_features.py                       # embedded SmolLM2 on embedded ShareGPT
    python generate_data_fused_features.py --aux-layers 2 16 29  # choose the fused layers
    python generate_data_fused_features.py --replies greedy      # self-distilled: the target's own replies,
                                                                 # features kept while they are generated
    python generate_data_fused_features.py --regenerate          # the target's own replies (T=0.8) first
    python generate_data_fused_features.py --regenerate --server-url http://localhost:30000/v1 --regenerate-only
    python generate_data_fused_features.py --regenerate --server-url http://localhost:30000/v1  # server stopped
    python allocation.py --script generate_data_fused_features.py --output-dir data_out/eagle3

Same storage, manifest, resume and allocation.py sharding as generate_data.py (modules/data/generation.py);
only the aux layers (default: the official EAGLE-3 choice, inputs of layers 2, N//2, N-3) and the
optional regeneration are added. Regenerated conversations are kept in OUTPUT_DIR/regenerated-*.jsonl,
so a killed run resumes with the same replies. With --server-url the target is loaded only after the
server has written every reply; --regenerate-only stops there, so the server can have the GPUs to
itself, and the same command without it then computes the features from the kept replies.
"""
import sys
from dataclasses import dataclass

from modules.data.generation_cli import FusedGenerateSettings, run, run_with_clear_errors
from modules.paths import DEFAULT_FUSED_DATA_DIR
from modules.settings import like, parse_settings


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--aux-layers 2 16 29). Every setting (those of generate_data.py,
# plus --aux-layers, --regenerate, --server-url, --server-model, --regenerate-only) is a field of
# FusedGenerateSettings in modules/data/generation_cli.py, with its default and help; re-declare one
# here to change its default. --batch-tokens is 0 (auto) as in generate_data.py (it was 8192: docs/settings.md).
@dataclass
class Settings(FusedGenerateSettings):
    output_dir: str = like(FusedGenerateSettings, "output_dir", default=str(DEFAULT_FUSED_DATA_DIR))
# ----------------------------------------------------------------------------- end of SETTINGS


def regenerate_rows_fn(args):
    """rows_fn for modules.data.generation_cli.run: regenerate (cached) before the features are computed.
    With --server-url the target is not loaded until the server has written every reply."""
    from pathlib import Path

    from modules.data.regenerate import LocalGenerator, OpenAIGenerator, regenerate_cached

    def rows_fn(rows, get_model, tokenizer, out_dir):
        if args.server_url:
            gen = OpenAIGenerator(args.server_url, args.server_model, args.temperature, args.max_new_tokens,
                                  concurrency=args.reply_batch_size)
        else:
            gen = LocalGenerator(get_model(), tokenizer, args.temperature, args.max_new_tokens, args.max_length,
                                 args.seed)
        cache = Path(out_dir) / f"regenerated-{args.start:08d}-{args.end if args.end is not None else 'end'}.jsonl"
        return regenerate_cached(rows, gen, cache, args.system_prompt, args.reply_batch_size,
                                 progress=not args.no_progress)

    return rows_fn


def main(argv=None) -> int:
    from modules.export.engines import default_aux_layers

    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])

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
        return run_with_clear_errors(lambda: run(args, **kwargs))
    except RegenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
