"""Compare recipe variants over seeds: the per-seed result files of benchmark/bench_learning_curve.py, grouped.

    # one bench_learning_curve.py run per variant and seed (--seed S --tag VARIANT-sS --result FILE), then:
    python benchmark/compare_recipes.py --variant \
        base=benchmark/results/recipe29_base.json,benchmark/results/recipe29_base_s1.json \
        spec=benchmark/results/recipe29_specrecipe.json,benchmark/results/recipe29_specrecipe_s1.json \
        --result benchmark/results/recipe29_seeds.json

Per variant and cell size: the mean, min and max over seeds of MT-bench tau (our decoder), held-out step-0 accuracy,
simulated tau and training seconds, and each variant's difference from the first one, per seed where the seeds pair
up (same seed: the same split of the data) and as a mean. A difference counts as a win only when every paired seed
agrees in sign (at least 2 paired seeds) and the mean difference exceeds the first variant's own spread (max - min
over all its seeds). Writes
RESULT (.json + .png: every seed as a point, the mean as a bar).
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from modules.io import atomic_write_text
from modules.settings import parse_settings, setting

METRICS = ("mt_bench_tau", "eval_top1_acc", "eval_tau_sim", "train_runtime_s")  # fields of a learning-curve cell
HIGHER_IS_BETTER = {"mt_bench_tau": True, "eval_top1_acc": True, "eval_tau_sim": True, "train_runtime_s": False}


# ----------------------------------------------------------------------------- SETTINGS
@dataclass
class Settings:
    variant: list[str] = setting([], "NAME=FILE[,FILE...]: a variant and its per-seed result files "
                                     "(bench_learning_curve.py --result), one or more; the first is the baseline")
    result: str = setting("benchmark/results/recipe_seeds.json", "result file (.json + .png)")
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_variants(specs: list[str]) -> dict[str, list[Path]]:
    variants = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        if not sep or not name or not files:
            raise SystemExit(f"error: --variant {spec!r}: expected NAME=FILE[,FILE...]")
        variants[name] = [Path(f) for f in files.split(",") if f]
    if len(variants) < 2:
        raise SystemExit("error: give at least two --variant (the first is the baseline)")
    return variants


def load_runs(files: list[Path]) -> dict[tuple[int, int], dict]:
    """{(conversations, seed): cell} from bench_learning_curve result files (one cell per conversations size)."""
    runs = {}
    for f in files:
        if not f.is_file():
            raise SystemExit(f"error: {f}: no such result file")
        report = json.loads(f.read_text())
        seed = report.get("settings", {}).get("seed", 0)
        for cell in report.get("cells", []):
            missing = [m for m in METRICS if m not in cell]
            if missing:
                raise SystemExit(f"error: {f}: cell {cell.get('name')!r} lacks {', '.join(missing)}")
            key = (cell["conversations"], seed)
            if key in runs:
                raise SystemExit(f"error: {f}: a second run of {cell['conversations']} conversations with seed {seed}")
            runs[key] = cell
    return runs


def stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def compare(variants: dict[str, dict]) -> dict:
    """Per conversations size: each variant's stats per metric, and its paired difference from the baseline."""
    names = list(variants)
    base = variants[names[0]]
    sizes = sorted({n for runs in variants.values() for n, _ in runs})
    table = {}
    for size in sizes:
        row = {}
        for name in names:
            runs = {seed: cell for (n, seed), cell in variants[name].items() if n == size}
            if not runs:
                continue
            entry = {"seeds": sorted(runs), **{m: stats([runs[s][m] for s in sorted(runs)]) for m in METRICS}}
            if name != names[0]:
                paired = sorted(s for s in runs if (size, s) in base)
                entry["vs_baseline"] = {}
                for m in METRICS:
                    diffs = [runs[s][m] - base[(size, s)][m] for s in paired]
                    if not diffs:
                        continue
                    base_vals = [cell[m] for (n, _), cell in base.items() if n == size]  # all its seeds
                    spread = max(base_vals) - min(base_vals)
                    sign = 1 if HIGHER_IS_BETTER[m] else -1
                    mean = sum(diffs) / len(diffs)
                    entry["vs_baseline"][m] = {
                        "paired_seeds": paired, "diffs": diffs, "mean_diff": mean, "baseline_spread": spread,
                        "wins": len(paired) >= 2 and all(sign * d > 0 for d in diffs) and sign * mean > spread}
            row[name] = entry
        table[size] = row
    return table


def print_table(table):
    for size, row in table.items():
        print(f"\n{size} conversations")
        print(f"{'variant':<16} {'seeds':>6} {'MT-bench tau':>22} {'step-0 acc':>22} {'sim tau':>22} {'train s':>12}"
              f"  vs baseline (tau)")
        for name, e in row.items():
            cols = " ".join(f"{e[m]['mean']:>8.4f} [{e[m]['min']:.3f}..{e[m]['max']:.3f}]" for m in METRICS[:3])
            vs = e.get("vs_baseline", {}).get("mt_bench_tau")
            note = ""
            if vs is not None:
                per_seed = ", ".join(f"{d:+.3f}" for d in vs["diffs"])
                note = (f"  {vs['mean_diff']:+.4f} (per seed {per_seed}; baseline spread {vs['baseline_spread']:.4f}): "
                        f"{'WIN' if vs['wins'] else 'not a win'}")
            print(f"{name:<16} {len(e['seeds']):>6} {cols} {e['train_runtime_s']['mean']:>12.0f}{note}")


def plot(table, path):
    from modules.training.curves import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 3.2), squeeze=False)
    for ax, (size, row) in zip(axes[0], table.items()):
        names = list(row)
        ax.bar(range(len(names)), [row[n]["mt_bench_tau"]["mean"] for n in names], color="#c6d4e8")
        for i, n in enumerate(names):
            vals = row[n]["mt_bench_tau"]["values"]
            ax.scatter([i] * len(vals), vals, color="#4c72b0", zorder=3, s=14)
        ax.set_xticks(range(len(names)), names, rotation=20)
        lo = min(min(row[n]["mt_bench_tau"]["values"]) for n in names)
        ax.set_ylim(max(1.0, lo - 0.05), None)
        ax.set_ylabel("MT-bench tau (our decoder)")
        ax.set_title(f"{size} conversations: seeds as points, mean as bar", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    variants = {name: load_runs(files) for name, files in parse_variants(args.variant).items()}
    table = compare(variants)
    print_table(table)
    out = Path(args.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"variants": {n: [str(f) for f in fs] for n, fs in parse_variants(args.variant).items()},
              "baseline": next(iter(variants)), "by_conversations": {str(k): v for k, v in table.items()}}
    atomic_write_text(out, json.dumps(report, indent=1))
    plot(table, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
