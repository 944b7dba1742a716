"""Self-distilled data: one pass (--replies greedy) against --regenerate + a second forward, same rows.

    python benchmark/bench_data_self_distill.py --threads 2      # embedded SmolLM2, 16 ShareGPT rows, 128 tokens/reply

Both make EAGLE-3 (fused) data whose replies are the target's own greedy replies:
  (a) today's two passes: `generate_data_fused_features.py --regenerate --temperature 0`: HF generate
      writes the replies turn by turn (regenerate.py), then the pipeline runs a full forward over
      every final conversation for the features;
  (b) one pass: `generate_data_fused_features.py --replies greedy`: the features are kept from the
      forwards that generate the replies (modules/data/self_distill.py).
Prints stored tokens/s of each (stored tokens / wall seconds, target already loaded) and their ratio,
the split of (a) into generation and forward, and how many conversations came out with the same ids.
"""
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.bench_data_generation import DataBenchSettings
from modules.data.chat import load_rows
from modules.export.engines import default_aux_layers
from modules.data.generation import GenerationSettings, generate_folder, resolve_batch_tokens
from modules.data.regenerate import LocalGenerator, regenerate_cached
from modules.data.storage import EagleDataset
from modules.target import load_target_model, load_tokenizer, model_display_name
from modules.settings import parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag; --config FILE reads them from a JSON/YAML file.
# --model, --dataset, --max-length, --dtype, --device, --threads: DataBenchSettings (bench_data_generation.py).
@dataclass
class Settings(DataBenchSettings):
    rows: int = setting(16, "dataset rows 0..ROWS-1")
    max_new_tokens: int = setting(128, "tokens per reply")
    batch_size: int = setting(8, "conversations generated together (both paths: --reply-batch-size)")
# ----------------------------------------------------------------------------- end of SETTINGS


def main(argv=None) -> int:
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    model = load_target_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    rows = load_rows(args.dataset, 0, args.rows)
    settings = GenerationSettings(
        model=model_display_name(args.model), dataset=args.dataset, start=0, end=args.rows,
        max_length=args.max_length, aux_layers=default_aux_layers(model.config.num_hidden_layers),
        batch_tokens=resolve_batch_tokens(0, device), max_new_tokens=args.max_new_tokens,
        reply_batch_size=args.batch_size)
    print(f"target {model_display_name(args.model)} ({next(model.parameters()).dtype}, {device}, "
          f"{torch.get_num_threads()} threads), rows 0-{args.rows}, max_new_tokens {args.max_new_tokens}, "
          f"max_length {args.max_length}, {args.batch_size} conversations per batch, aux layers {settings.aux_layers}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # (a) --regenerate (HF generate, greedy) then the full forward of the pipeline
        start = time.perf_counter()
        gen = LocalGenerator(model, tokenizer, temperature=0.0, max_new_tokens=args.max_new_tokens,
                             max_prompt_tokens=args.max_length)
        regenerated = regenerate_cached(rows, gen, tmp / "regenerated.jsonl", None, args.batch_size, progress=False)
        t_generate = time.perf_counter() - start
        two = generate_folder(model, tokenizer, regenerated, tmp / "two_pass", settings, progress=False)
        t_two = time.perf_counter() - start
        # (b) --replies greedy: features kept while generating
        start = time.perf_counter()
        one_settings = GenerationSettings(**{**settings.__dict__, "replies": "greedy"})
        one = generate_folder(model, tokenizer, rows, tmp / "one_pass", one_settings, progress=False)
        t_one = time.perf_counter() - start
        a, b = EagleDataset(tmp / "two_pass"), EagleDataset(tmp / "one_pass")
        ids_a = {int(r): a[i]["input_ids"] for i, r in enumerate(a.row_ids)}
        ids_b = {int(r): b[i]["input_ids"] for i, r in enumerate(b.row_ids)}
        same = sum(1 for r in ids_a if r in ids_b and torch.equal(ids_a[r], ids_b[r]))

    tps_two, tps_one = two["tokens"] / t_two, one["tokens"] / t_one
    print("\n| path | seconds | stored tokens | stored tokens/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| (a) --regenerate (HF generate greedy) + forward | {t_two:,.1f} (generate {t_generate:,.1f}, "
          f"forward {t_two - t_generate:,.1f}) | {two['tokens']:,} | {tps_two:,.1f} | 1.00x |")
    print(f"| (b) --replies greedy (features while generating) | {t_one:,.1f} | {one['tokens']:,} | "
          f"{tps_one:,.1f} | {tps_one / tps_two:.2f}x |")
    print(f"(rows written {two['rows_written']} / {one['rows_written']}, skipped {two['skipped']} / {one['skipped']}; "
          f"conversations with identical stored ids: {same} of {len(ids_a)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
