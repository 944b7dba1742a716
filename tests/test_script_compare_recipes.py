"""benchmark/compare_recipes.py: a recipe variant wins over seeds only when every paired seed agrees and the mean
difference exceeds the baseline's own seed spread."""
import json

import pytest

from benchmark import compare_recipes


def result_file(path, seed, tau, acc=0.2, conversations=220):
    cell = {"name": f"c{seed}", "conversations": conversations, "mt_bench_tau": tau, "eval_top1_acc": acc,
            "eval_tau_sim": 1.1, "train_runtime_s": 300.0}
    path.write_text(json.dumps({"settings": {"seed": seed}, "cells": [cell]}))
    return str(path)


def run(tmp_path, base, other):
    files = {name: ",".join(result_file(tmp_path / f"{name}{s}.json", s, t) for s, t in enumerate(taus))
             for name, taus in (("base", base), ("new", other))}
    out = tmp_path / "cmp.json"
    assert compare_recipes.main(["--variant", f"base={files['base']}", f"new={files['new']}",
                                 "--result", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (tmp_path / "cmp.png").is_file()
    return report["by_conversations"]["220"]["new"]["vs_baseline"]["mt_bench_tau"]


def test_a_consistent_gain_beyond_the_spread_wins(tmp_path):
    vs = run(tmp_path, [1.26, 1.27, 1.25], [1.32, 1.31, 1.30])
    assert vs["wins"] and vs["paired_seeds"] == [0, 1, 2]
    assert vs["mean_diff"] == pytest.approx(0.05)


def test_control_a_seed_that_disagrees_is_not_a_win(tmp_path):
    assert not run(tmp_path, [1.26, 1.27, 1.25], [1.32, 1.26, 1.30])["wins"]


def test_control_a_gain_inside_the_baseline_spread_is_not_a_win(tmp_path):
    assert not run(tmp_path, [1.20, 1.30, 1.25], [1.24, 1.31, 1.27])["wins"]


def test_a_file_without_the_metrics_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"settings": {"seed": 0}, "cells": [{"name": "x", "conversations": 5}]}))
    good = result_file(tmp_path / "good.json", 0, 1.2)
    with pytest.raises(SystemExit, match="bad.json"):
        compare_recipes.main(["--variant", f"base={good}", f"new={bad}", "--result", str(tmp_path / "o.json")])
