"""Training curves from a Trainer's log_history: loss, top-1 accuracy and simulated tau -> one PNG."""
import json
from pathlib import Path

from modules.io import atomic_write, atomic_write_text


def save_log_history(log_history, path):
    """log_history (list of dicts) as JSON, atomically."""
    atomic_write_text(Path(path), json.dumps(log_history, indent=1))


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure as PNG atomically (a killed run never leaves half an image) and close it."""
    import matplotlib.pyplot as plt

    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)


def plot_training_curves(log_history, path, title="EAGLE draft training"):
    """Three panels: train loss, train/eval top-1 accuracy, eval simulated tau (when logged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [entry for entry in log_history if "loss" in entry and "step" in entry]
    evals = [entry for entry in log_history if any(k.endswith("tau_sim") for k in entry)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot([entry["step"] for entry in train], [entry["loss"] for entry in train], label="loss")
    if train and "reg_loss" in train[0]:
        axes[0].plot([entry["step"] for entry in train], [entry["reg_loss"] for entry in train], label="reg (SmoothL1)")
    axes[0].set(xlabel="step", ylabel="loss")
    top1 = [entry for entry in train if "top1_acc" in entry]
    axes[1].plot([entry["step"] for entry in top1], [entry["top1_acc"] for entry in top1], label="train")
    ev1 = [entry for entry in evals if "eval_top1_acc" in entry]
    axes[1].plot([entry["step"] for entry in ev1], [entry["eval_top1_acc"] for entry in ev1], marker="o", label="eval")
    axes[1].set(xlabel="step", ylabel="top-1 accuracy")

    def tau(entry):  # the value of the entry's first key ending in "tau_sim"
        return next(value for key, value in entry.items() if key.endswith("tau_sim"))

    axes[2].plot([entry["step"] for entry in evals], [tau(entry) for entry in evals], marker="o", color="C2")
    axes[2].set(xlabel="step", ylabel="eval simulated tau")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_run_outputs(output_dir, log_history, summary, title="EAGLE draft training"):
    """What a finished run leaves beside its draft: log_history.json, training_curves.png and
    summary.json (all atomic); prints the summary on one line."""
    output_dir = Path(output_dir)
    save_log_history(log_history, output_dir / "log_history.json")
    plot_training_curves(log_history, output_dir / "training_curves.png", title=title)
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    print("done: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
