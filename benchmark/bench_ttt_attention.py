"""TTT attention benchmark: peak memory and time of one EAGLE-3 training step, eager vs SDPA.

    python benchmark/bench_ttt_attention.py                          # Llama-3.1-8B draft shapes, T=2048, 7 steps
    python benchmark/bench_ttt_attention.py --seq-len 2048 --steps 3  # the CPU run in benchmark/README.md
                                                                      # (~11 min, 2 cores)
    python benchmark/bench_ttt_attention.py --device cuda             # bf16 on a GPU
    python benchmark/bench_ttt_attention.py --attention-only          # the TTT attention calls alone (seconds)

One training step = TTTTrainer.compute_loss (the unrolled draft steps, the per-step soft
cross-entropy against the target head, exactly as in training) + backward; the optimizer step
is left out (its memory and time do not depend on the attention). The draft is an Eagle3Draft
with the shapes of a Llama-3.1-8B draft (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
32k draft vocabulary), random weights and random features; both variants get the same weights and
inputs (same seed), so their losses must agree, and are printed side by side. --attention-only
measures just the attention of the unrolled steps (modules/draft/ttt_attention.py on random per-step
q/k/v of [batch, heads, T, head_dim], forward + backward of a weighted sum of the outputs): what the
attention itself adds, without the rest of the draft, at full T and step count in seconds.

Each variant (--attn eager: the reference [heads, T, T] scores with an fp32 softmax; sdpa:
modules/draft/ttt_attention.ttt_sdpa_output) runs in its own fresh process. Peak memory of the step, two
measures, both above the memory held just before the step (weights, inputs):
  - tensors: the peak of the bytes held by live tensors created during the step (every op's output
    storage is counted from its creation until it is freed, through a TorchDispatchMode; the weight
    gradients are created in the step, so they count). Exact for tensors; kernels' private
    workspaces are not seen. On CUDA: torch.cuda.max_memory_allocated instead.
  - process (CPU only): the resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs just before the step) minus the resident set then. Everything the process
    touched, allocator effects included: freed blocks below glibc's mmap threshold stay resident, so
    it is an upper bound, and a peak late in the backward (when the weight gradients exist) can hide
    what the forward kept.
Time: wall clock of the step (one run, no warm-up: the step is seconds to minutes long).
Writes OUT (JSON) and a PNG next to it.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modules.paths import REPO_ROOT
from modules.io import atomic_write_text
from modules.settings import parse_settings, setting

# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--seq-len 512); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    hidden: int = setting(4096, "hidden size (Llama-3.1-8B)")
    intermediate: int = setting(14336, "MLP size")
    heads: int = setting(32, "attention heads (head_dim = hidden / heads: 128)")
    kv_heads: int = setting(8, "key/value heads")
    draft_vocab: int = setting(32000, "the EAGLE-3 draft vocabulary of the released 8B drafts")
    target_vocab: int = setting(32000, "the frozen embedding / target head rows; Llama-3.1's 128256 only adds "
                                       "weights")
    seq_len: int = setting(2048, "tokens per sequence (slots after the shift); fewer for a quicker run")
    steps: int = setting(7, "unrolled TTT steps (official EAGLE-3: 7); fewer for a quicker run")
    batch: int = setting(1, "sequences per step")
    variants: list[str] = setting(["eager", "sdpa"], "attention variants, each in its own process",
                                  choices=["eager", "sdpa"])
    device: str = setting("auto", "auto = cuda when available, else cpu")
    dtype: str = setting("auto", "auto = bf16 autocast on cuda, fp32 on cpu", choices=["auto", "fp32", "bf16"])
    threads: int | None = setting(None, "CPU threads (None: torch's default)")
    seed: int = setting(0, "seed of the weights and inputs")
    attention_only: bool = setting(False, "only the TTT attention calls, random q/k/v", action="store_true")
    out: str = setting(str(REPO_ROOT / "benchmark" / "results" / "ttt_attention_cpu.json"),
                       "result file (JSON; a PNG is written beside it)")
    child: str | None = setting(None, "child process mode: VARIANT:RESULT_PATH", hidden=True)
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.splitlines()[0])


def proc_status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active (each counted once, until freed).
    An output sharing an input's storage (a view, an in-place op) allocates nothing: not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.counted and key not in inputs:
                    self.counted.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def use_bf16(args, device):
    """--dtype bf16, or --dtype auto on a GPU."""
    return args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")


def build(args, device):
    """(trainer, draft, batch) for one step at the configured shapes; same seed -> same everything."""
    from transformers import LlamaConfig

    from modules.draft.eagle3_draft import Eagle3Draft, make_eagle3_config
    from modules.training.ttt_trainer import TTTTrainer, TTTTrainingArguments

    torch.manual_seed(args.seed)
    target_cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=32,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             vocab_size=args.target_vocab, max_position_embeddings=131072)
    draft = Eagle3Draft(make_eagle3_config(target_cfg, args.draft_vocab, [2, 16, 29]))
    draft.set_draft_vocab(torch.randperm(args.target_vocab)[:args.draft_vocab].sort().values)
    target_head = torch.randn(args.target_vocab, args.hidden) * 0.02
    B, L, H = args.batch, args.seq_len + 1, args.hidden  # L tokens -> L - 1 slots
    batch = {"input_ids": torch.randint(0, args.target_vocab, (B, L)),
             "loss_mask": torch.ones(B, L, dtype=torch.long), "attention_mask": torch.ones(B, L, dtype=torch.long),
             "hidden_states": torch.randn(B, L, H), "aux_hidden_states": torch.randn(B, L, 3 * H)}
    targs = TTTTrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench_ttt_"), report_to=[],
                                 use_cpu=device.type == "cpu", bf16=use_bf16(args, device), w_reg=0.0, w_cls=1.0,
                                 noise_std=0.0, ttt_steps=args.steps, per_device_train_batch_size=B)
    draft.to(device)
    trainer = TTTTrainer(model=draft, args=targs, target_head=target_head)
    return trainer, draft, {k: v.to(device) for k, v in batch.items()}


def attention_only_step(args, variant, device):
    """(loss, callable for the step) of the TTT attention alone: step k attends over k+1 key sets."""
    from modules.draft.ttt_attention import step0_mask, ttt_scores_softmax_output, ttt_sdpa_output

    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if use_bf16(args, device) else torch.float32
    d = args.hidden // args.heads
    shape = (args.batch, args.heads, args.seq_len, d)
    qs, keys, values = ([torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                         for _ in range(args.steps)] for _ in range(3))
    weight = torch.randn(shape, device=device, dtype=dtype)
    mask = step0_mask(None, args.seq_len, device)

    def step():
        loss = 0.0
        for k in range(args.steps):
            if variant == "eager":
                out = ttt_scores_softmax_output(qs[k], keys[:k + 1], values[:k + 1], mask.dense, d ** -0.5)
            else:
                out = ttt_sdpa_output(qs[k], keys[:k + 1], values[:k + 1], d ** -0.5)
            loss = loss + (out.float() * weight).sum()
        loss.backward()
        return loss, [t.grad for t in qs + keys + values]
    return step


def run_variant(args, variant, result_path):
    """Child process: one training step with TTT attention `variant`; writes its figures as JSON."""
    import gc

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.attention_only:
        step = attention_only_step(args, variant, device)
        dtype = "bf16" if use_bf16(args, device) else "fp32"
    else:
        trainer, draft, batch = build(args, device)
        draft.config._attn_implementation = variant
        draft.train()
        dtype = "bf16 autocast" if trainer.args.bf16 else "fp32"

        def step():
            loss = trainer.compute_loss(draft, batch)
            loss.backward()
            return loss, [p.grad for p in draft.parameters() if p.grad is not None]
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
        before = proc_status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    with LiveTensorPeak() as tensors:
        loss, grads = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status_kb("VmHWM") * 1024
    grad_norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
    result = {"variant": variant, "step_s": seconds,
              "step_peak_gb": ((peak - before) if cuda else tensors.peak) / 2**30,
              "memory_kind": "cuda max_memory_allocated" if cuda else "live tensors (TorchDispatchMode)",
              "process_step_peak_gb": None if cuda else (peak - before) / 2**30,
              "process_before_gb": None if cuda else before / 2**30,
              "process_peak_gb": None if cuda else peak / 2**30,
              "loss": float(loss.detach()), "grad_norm": float(grad_norm), "device": str(device),
              "dtype": dtype, "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    atomic_write_text(Path(result_path), json.dumps(result, indent=2))


def print_table(result):
    s = result["settings"]
    what = "the TTT attention alone" if s["attention_only"] else "one TTT training step"
    print(f"\n{what} (forward + backward), hidden {s['hidden']}, {s['heads']}/{s['kv_heads']} heads, "
          f"draft vocab {s['draft_vocab']:,}, batch {s['batch']} x T={s['seq_len']}, {s['steps']} steps")
    print(f"{'attention':>9} | {'time s':>8} | {'peak GB (tensors)':>17} | {'peak GB (process)':>17} | "
          f"{'loss':>10} | {'grad norm':>10}")
    for r in result["variants"].values():
        process = "-" if r["process_step_peak_gb"] is None else f"{r['process_step_peak_gb']:.2f}"
        print(f"{r['variant']:>9} | {r['step_s']:>8.1f} | {r['step_peak_gb']:>17.2f} | {process:>17} | "
              f"{r['loss']:>10.5f} | {r['grad_norm']:>10.5f}")
    r0 = next(iter(result["variants"].values()))
    print(f"memory above the step's start (see the docstring); {r0['device']}, {r0['dtype']}, "
          f"{r0['threads']} threads; eager's step-0 scores alone: {result['scores_gb_per_step']:.2f} GB per step "
          f"([B, heads, T, T] fp32)")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.training.curves import save_figure

    rs = list(result["variants"].values())
    names = [r["variant"] for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "step_peak_gb", "peak memory of the step (GB)"),
                           (axes[1], "step_s", "time of the step (s)")):
        bars = ax.bar(names, [r[key] for r in rs], color=["tab:red", "tab:green"][:len(rs)])
        ax.bar_label(bars, fmt="%.2f" if key == "step_peak_gb" else "%.0f")
        ax.set(ylabel=label, xlabel="TTT attention")
        ax.grid(alpha=0.3, axis="y")
    s = result["settings"]
    what = "TTT attention alone" if s["attention_only"] else "EAGLE-3 TTT training step"
    fig.suptitle(f"{what}, 8B draft shapes, T={s['seq_len']}, {s['steps']} steps ({rs[0]['device']})",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        variant, path = args.child.split(":", 1)
        run_variant(args, variant, path)
        return 0
    results, load_at_start = {}, os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            print(f"=== {variant} ===", flush=True)
            path = Path(tmp) / f"{variant}.json"
            r = subprocess.run([sys.executable, __file__, *argv, "--child", f"{variant}:{path}"])
            if r.returncode != 0:
                print(f"error: variant {variant} failed (exit {r.returncode})", file=sys.stderr)
                return 1
            results[variant] = json.loads(path.read_text())
    settings = {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "draft_vocab",
                                              "target_vocab", "seq_len", "steps", "batch", "dtype", "seed",
                                              "attention_only")}
    result = {"command": "python benchmark/bench_ttt_attention.py " + " ".join(argv), "settings": settings,
              "scores_gb_per_step": args.batch * args.heads * args.seq_len ** 2 * 4 / 2**30,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_start": load_at_start,
                          "load_average_at_end": os.getloadavg()},
              "variants": results}
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"saved {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
