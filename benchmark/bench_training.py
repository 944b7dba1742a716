"""Training benchmark: our EAGLE-1/2 recipe vs the BaldEagle recipe on the same data and budget.

    python generate_data.py --end 240 --max-length 1024 --outdir /tmp/bench_data   # once
    python benchmark/bench_training.py --data /tmp/bench_data
    # benchmark/README.md figures: 1,000 conversations x 2048 tokens, 2 epochs, eval every half epoch
    # (65 min, 2 CPU cores)
    python benchmark/bench_training.py --data DIR --train-conversations 1000 --eval-conversations 20 \
        --max-length 2048 --epochs 2 --evals-per-epoch 2

Both runs use the same draft initialisation, data order, split, lr schedule, noise and loss
weights; the only difference is the cross-entropy term: ours lets its gradient reach the draft,
BaldEagle's trainer detaches the prediction (so its CE term trains nothing). Each recipe runs in
its own process (clean peak-memory figure). Prints per-epoch eval top-1 accuracy and simulated
acceptance length (tau, chain of SIM_STEPS) side by side, training tokens/s and peak memory,
and saves a PNG.
"""
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.paths import DEFAULT_DATA_DIR, REPO_ROOT
from modules.io import atomic_write_text
from modules.settings import like, parse_settings, setting
from modules.training.settings import TrainingSettings


RECIPES = {"ours": {"detach_cls_pred": False}, "baldeagle": {"detach_cls_pred": True}}


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag; --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    # Defaults sized for ~15 minutes on 2 shared CPU cores (the LM head, 49152 x 576, dominates): a subset of
    # the conversations, cut to MAX_LENGTH tokens. On a GPU use all of them (0) and 2048.
    data: list[str] = setting([str(DEFAULT_DATA_DIR)], "data folders (generate_data.py)")
    model: str | None = setting(None, "target of the data; None = embedded SmolLM2-135M-Instruct")
    train_conversations: int = setting(24, "subset of the data; 0 = all but the eval ones")
    eval_conversations: int = setting(8, "held-out conversations")
    max_length: int = like(TrainingSettings, "max_length", 384)
    epochs: int = like(TrainingSettings, "epochs", 3)
    lr: float = like(TrainingSettings, "lr", 5e-4, help="peak learning rate (short budget: higher than train.py's "
                                                         "default)")
    batch_size: int = like(TrainingSettings, "batch_size")
    grad_accum: int = like(TrainingSettings, "grad_accum", 1)
    sim_steps: int = setting(5, "chain length of the simulated tau")
    evals_per_epoch: int = setting(1, ">1: also evaluate inside epochs (curves from a single long epoch)")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA and on CPUs with bf16 units, else fp32",
                             choices=["auto", "bf16", "fp32"])
    seed: int = setting(0, "seed of the split, the draft and the data order")
    output_dir: str = setting(str(REPO_ROOT / "outputs" / "bench_training"), "the recipes' runs and results",
                              aliases=["--out"])
    recipe: str | None = setting(None, "child process mode: train this recipe", choices=list(RECIPES), hidden=True)
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    return parse_settings(Settings, argv, description=__doc__.splitlines()[0])


def use_bf16(precision):
    import torch
    from modules.target import cpu_has_fast_bf16

    if precision != "auto":
        return precision == "bf16"
    return torch.cuda.is_available() or cpu_has_fast_bf16()


def run_recipe(args):
    """Child process: train one recipe, write OUT/<recipe>.json."""
    import random

    import torch
    from transformers import set_seed

    from modules.data.collate import EagleCollator
    from modules.draft.eagle_draft import EagleDraft
    from modules.data.storage import EagleDataset
    from modules.training.eagle_trainer import EagleTrainer, EagleTrainingArguments

    ds = EagleDataset(args.data, read_aux=False)
    idx = list(range(len(ds)))
    random.Random(args.seed).shuffle(idx)
    eval_idx = idx[: args.eval_conversations]
    train_idx = idx[args.eval_conversations:]
    if args.train_conversations:
        train_idx = train_idx[: args.train_conversations]
    train_ds, eval_ds = torch.utils.data.Subset(ds, train_idx), torch.utils.data.Subset(ds, eval_idx)
    lengths = ds.lengths
    train_tokens = int(sum(min(int(lengths[i]), args.max_length + 1) - 1 for i in train_idx))

    set_seed(args.seed)
    draft = EagleDraft.from_target(args.model)
    cuda = torch.cuda.is_available()
    # eval_steps < 1 is a fraction of all training steps (transformers' convention)
    eval_schedule = {"eval_strategy": "epoch"} if args.evals_per_epoch <= 1 else {
        "eval_strategy": "steps", "eval_steps": 1.0 / (args.epochs * args.evals_per_epoch)}
    targs = EagleTrainingArguments(
        output_dir=str(Path(args.output_dir) / args.recipe), num_train_epochs=args.epochs, learning_rate=args.lr,
        warmup_steps=0.05, min_lr_ratio=0.1, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=1, gradient_accumulation_steps=args.grad_accum, max_grad_norm=0.5,
        adam_beta2=0.95, bf16=use_bf16(args.precision), use_cpu=not cuda, **eval_schedule,
        save_strategy="no", logging_steps=10, report_to="none", seed=args.seed, disable_tqdm=False,
        sim_steps=args.sim_steps, remove_unused_columns=False, **RECIPES[args.recipe])
    trainer = EagleTrainer(model=draft, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                           data_collator=EagleCollator(max_length=args.max_length))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    last_eval = [entry for entry in trainer.state.log_history if "eval_tau_sim" in entry][-1:]
    if not last_eval or last_eval[0]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the step schedule can stop short of the last step; always end with an eval
    wall = time.time() - t0
    trainer.save_model(str(Path(args.output_dir) / args.recipe / "final"))  # modules.draft.loading.load_draft reads it
    evals = [entry for entry in trainer.state.log_history if "eval_tau_sim" in entry]
    eval_time = sum(entry["eval_runtime"] for entry in evals)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    result = {
        "recipe": args.recipe, "train_conversations": len(train_idx), "eval_conversations": len(eval_idx),
        "train_tokens_per_epoch": train_tokens, "epochs": args.epochs, "bf16": targs.bf16,
        "per_epoch": [{k: entry[k] for k in ("epoch", "eval_top1_acc", "eval_top3_acc", "eval_tau_sim",
                                             "eval_reg_loss", "eval_cls_loss")} for entry in evals],
        "train_tokens_per_s": train_tokens * args.epochs / max(wall - eval_time, 1e-6),
        "train_wall_s": wall, "eval_s": eval_time,
        "peak_memory_gb": peak / 2**30, "peak_memory_kind": "cuda allocated" if cuda else "process RSS",
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.output_dir) / f"{args.recipe}.json", json.dumps(result, indent=2))


def print_table(results):
    ours, bald = results["ours"], results["baldeagle"]
    print(f"\ndata: {ours['train_conversations']} train conversations "
          f"({ours['train_tokens_per_epoch']:,} tokens/epoch), {ours['eval_conversations']} eval; "
          f"{ours['epochs']} epochs; {'bf16 autocast' if ours['bf16'] else 'fp32'}")
    print(f"{'epoch':>5} | {'top-1 ours':>10} {'top-1 BaldEagle':>15} | {'tau ours':>8} {'tau BaldEagle':>13}")
    for a, b in zip(ours["per_epoch"], bald["per_epoch"]):
        print(f"{a['epoch']:>5.2f} | {a['eval_top1_acc']:>10.3f} {b['eval_top1_acc']:>15.3f} | "
              f"{a['eval_tau_sim']:>8.3f} {b['eval_tau_sim']:>13.3f}")
    for name, r in (("ours", ours), ("BaldEagle", bald)):
        print(f"{name:>10}: {r['train_tokens_per_s']:,.0f} train tokens/s, peak memory "
              f"{r['peak_memory_gb']:.2f} GB ({r['peak_memory_kind']}), {r['train_wall_s']:.0f} s wall "
              f"({r['eval_s']:.0f} s of it eval)")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.training.curves import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, r in results.items():
        ep = [e["epoch"] for e in r["per_epoch"]]
        axes[0].plot(ep, [e["eval_top1_acc"] for e in r["per_epoch"]], marker="o", label=name)
        axes[1].plot(ep, [e["eval_tau_sim"] for e in r["per_epoch"]], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="eval top-1 accuracy")
    axes[1].set(xlabel="epoch", ylabel="simulated tau (chain)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.recipe:
        run_recipe(args)
        return 0
    from modules.data.storage import DataFormatError, EagleDataset
    try:
        EagleDataset(args.data)  # fail early, with one line, on missing / bad data
    except DataFormatError as err:
        print(f"error: {err} (make data first, e.g. python generate_data.py --end 240 --max-length 1024)",
              file=sys.stderr)
        return 2
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for recipe in RECIPES:
        print(f"=== {recipe} ===", flush=True)
        r = subprocess.run([sys.executable, __file__, *passthrough, "--recipe", recipe])
        if r.returncode != 0:
            print(f"error: recipe {recipe} failed (exit {r.returncode})", file=sys.stderr)
            return 1
        results[recipe] = json.loads((Path(args.output_dir) / f"{recipe}.json").read_text())
    print_table(results)
    png = Path(args.output_dir) / "bench_training.png"
    plot(results, png)
    atomic_write_text(Path(args.output_dir) / "results.json", json.dumps(results, indent=2))
    print(f"saved {png} and {Path(args.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
