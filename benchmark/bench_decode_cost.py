"""What one decoding cycle costs on this machine, piece by piece: the target forward over q new tokens
(a plain step is q=1, a tree verify is q=tree size) in fp32 and bf16, and one draft forward. fp32 runs
both with oneDNN pre-packed linear layers (modules/cpu_linear.py, what every script uses on CPU) and with
torch's own MKL path (`fp32 mkl`), side by side.

    python benchmark/bench_decode_cost.py                                  # embedded SmolLM2, outputs/eagle3 draft
    python benchmark/bench_decode_cost.py --draft demo_out/train/draft --dtypes fp32 bf16 --sizes 1 4 8 16

Speculative decoding pays when tau x (plain step) > (tree verify) + (draft forwards) + decoder overhead,
so the ratio verify(q) / step(1) of each dtype says how large a tree the target can verify almost for
free, and the draft column how many draft levels fit. Every forward runs on a KV cache of --context
tokens with a 4D tree mask, as the decoder runs it (modules/decode/tree_decoding.py); the median of
--repeats timed runs after warm-up. Prints a table and writes OUT (JSON) and a PNG next to it.
"""
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.io import atomic_write_text
from modules.settings import parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--sizes 1 8); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    model: str | None = setting(None, "target: hub id, local folder or .gguf; None = embedded SmolLM2-135M-Instruct")
    draft: str = setting("outputs/eagle3", "a draft folder (or a training output folder); '' = target only")
    dtypes: list[str] = setting(["fp32", "bf16"], "target dtypes to measure")
    linear: list[str] = setting(["packed", "mkl"], "fp32 linear kernels to measure, side by side: oneDNN pre-packed "
                                                   "(modules/cpu_linear.py, the default) / torch's own (bf16 always "
                                                   "runs torch's own)", choices=["packed", "mkl"])
    sizes: list[int] = setting([1, 2, 4, 8, 16], "new tokens per forward: 1 = a plain decoding step, >1 = a tree "
                                                 "verify")
    context: int = setting(300, "tokens already in the KV cache")
    repeats: int = setting(30, "timed runs per measurement (the median is kept)")
    threads: int | None = setting(None, "torch threads (None: torch's default)")
    out: str = setting("benchmark/results/decode_cost.json", "result file (JSON; a PNG is written beside it)")
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.splitlines()[0])


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def target_costs(target, sizes, context, repeats, aux):
    """ms of one target forward (+ LM head over the new tokens) over q tokens on a `context` cache."""
    from modules.kv_cache import TreeKVCache

    base, head = target.model, target.get_output_embeddings()
    vocab = target.config.vocab_size
    cache = TreeKVCache(target.config.num_hidden_layers, context + max(sizes) + 1)
    gen = torch.Generator().manual_seed(0)
    base(input_ids=torch.randint(0, vocab, (1, context), generator=gen), past_key_values=cache, use_cache=True)
    costs = {}
    for q in sizes:
        ids = torch.randint(0, vocab, (1, q), generator=gen)
        pos = torch.arange(context, context + q).unsqueeze(0)
        mask = torch.ones(1, 1, q, context + q, dtype=torch.bool)

        def forward():
            out = base(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                       use_cache=True, output_hidden_states=aux)
            head(out.last_hidden_state[0]).argmax(-1)
            cache.truncate(context)
        costs[q] = median_ms(forward, repeats)
    return costs


def draft_costs(draft, sizes, context, repeats, dtype):
    """ms of one draft forward (+ its head and top-k) over q tree tokens on a `context` draft cache."""
    from modules.decode.tree import MaskBuffer
    from modules.draft.kinds import kind_of

    adapter = kind_of(draft).tree_adapter(draft)
    cache = adapter.new_cache(context + max(sizes) + 1)
    width = draft.config.hidden_size
    masks = MaskBuffer(max(context, max(sizes)), context + max(sizes) + 1, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    prompt_feats = torch.randn(1, context, width, generator=gen).to(dtype)
    adapter.forward(torch.randint(0, 100, (1, context), generator=gen), prompt_feats,
                    torch.arange(context).unsqueeze(0), masks.causal_after(0, context), cache)
    costs = {}
    for q in sizes:
        ids = torch.randint(0, 100, (1, q), generator=gen)
        feats = torch.randn(1, q, width, generator=gen).to(dtype)
        pos = torch.full((1, q), context)
        mask = masks.tree(context, torch.eye(q, dtype=torch.bool))

        def forward():
            h = adapter.forward(ids, feats, pos, mask, cache)
            adapter.logprobs(h[0]).topk(min(4, q * 4), dim=-1)
            cache.truncate(context)
        costs[q] = median_ms(forward, repeats)
    return costs


def plain_generate_ms(target, repeats):
    """ms per token of HF greedy generate (the plain baseline the benchmarks use), 32 new tokens."""
    ids = torch.randint(0, target.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(1))

    def run():
        target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                        do_sample=False, pad_token_id=0)
    return median_ms(run, max(2, repeats // 10), warmup=1) / 32


def measure(args):
    from modules.cpu_linear import pack_linears, unpack_linears
    from modules.draft.loading import load_draft
    from modules.target import load_target, pick_dtype

    rows = {}
    for name in args.dtypes:
        dtype = pick_dtype(name)
        target, _ = load_target(args.model, dtype=name, device="cpu")
        draft = None
        if args.draft:
            draft = load_draft(resolve(args.draft), target_model=target, dtype=dtype).eval()
        aux = draft is not None and getattr(draft.config, "eagle_aux_hidden_state_layer_ids", None) is not None
        for linear in (args.linear if dtype == torch.float32 else ["packed"]):
            for model in (target, draft):  # the same loaded weights, switched between the two kernels
                if model is not None:
                    (pack_linears if linear == "packed" else unpack_linears)(model)
            with torch.no_grad():
                row = {"target_ms": target_costs(target, args.sizes, args.context, args.repeats, aux),
                       "hf_generate_ms_per_token": plain_generate_ms(target, args.repeats)}
                if draft is not None:
                    row["draft_ms"] = draft_costs(draft, [s for s in args.sizes if s <= 16], args.context,
                                                  args.repeats, dtype)
            label = name if dtype != torch.float32 or linear == "packed" else f"{name} {linear}"
            rows[label] = row
            print_row(label, row, args.sizes)
        del target, draft
    return rows


def resolve(folder):
    from benchmark.bench_eagle import resolve_draft_dir

    found = resolve_draft_dir(Path(folder))
    if found is None:
        sys.exit(f"error: no draft in {folder} (no config.json there, in draft/ or in checkpoint-*/)")
    return found


def print_row(name, row, sizes):
    step = row["target_ms"][1] if 1 in row["target_ms"] else None
    print(f"\n{name}: HF generate {row['hf_generate_ms_per_token']:.1f} ms/token")
    print("  q  | target ms | x step(1) | draft ms")
    for q in sizes:
        t = row["target_ms"][q]
        d = row.get("draft_ms", {}).get(q)
        ratio = f"{t / step:8.2f}x" if step else "        "
        print(f"  {q:<3}| {t:9.1f} | {ratio}  | {'' if d is None else f'{d:8.1f}'}", flush=True)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.training.curves import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, row in rows.items():
        qs = sorted(row["target_ms"])
        ax.plot(qs, [row["target_ms"][q] for q in qs], marker="o", label=f"target {name}")
        if "draft_ms" in row:
            dq = sorted(row["draft_ms"])
            ax.plot(dq, [row["draft_ms"][q] for q in dq], marker="s", linestyle="--", label=f"draft {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("new tokens per forward (1 = plain step, more = tree verify)")
    ax.set_ylabel("ms per forward (median)")
    ax.set_title("decoding cost per forward")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    out = Path(args.out)
    command = "python benchmark/bench_decode_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "context": args.context, "repeats": args.repeats, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwritten {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
