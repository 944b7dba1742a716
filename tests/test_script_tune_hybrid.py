"""benchmark/tune_hybrid.py: min_match picked on the tuning split with our decoder, on a tiny random target and draft
(the random target repeats itself, so the lookup has matches); a reported set is refused."""
import json

import pytest

from tests._helpers_decode import one_thread  # noqa: F401 (autouse: restores torch threads)
from tests.test_script_bench_eagle import tiny_bench_dirs  # noqa: F401 (the fixture)

from benchmark import tune_hybrid


def test_min_match_is_chosen_on_the_tuning_split(tiny_bench_dirs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "tune.json"
    res = tune_hybrid.main(["--model", str(tiny_bench_dirs / "target"), "--draft", str(tiny_bench_dirs / "draft"),
                            "--num-questions", "2", "--max-new-tokens", "24", "--depth", "3", "--candidates", "1", "4",
                            "--threads", "1", "--out", str(out)])
    s = json.loads(out.read_text())["summary"]
    assert set(s) == {"draft alone", "min_match 1", "min_match 4"}
    assert all(m["matched_plain"] == m["runs"] == 2 for m in s.values())  # lossless, 2 prompts each
    assert res["settings"]["prompts"] == "sharegpt-tune"
    assert "lookup_cycle_share" not in s["draft alone"] and s["min_match 1"]["lookup_cycle_share"] > 0
    assert s["min_match 1"]["tau"] > s["draft alone"]["tau"]  # a random draft: what it gains is the lookup's
    best = max((1, 4), key=lambda n: (s[f"min_match {n}"]["tau"], n))
    assert res["chosen_min_match"] == best
    assert f"--hybrid-lookup {best}" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000


def test_the_choice_rule_and_a_reported_set_refused():
    summary = {"draft alone": {"tau": 1.1, "matched_plain": 4, "runs": 4},
               "min_match 2": {"tau": 1.5, "matched_plain": 4, "runs": 4},
               "min_match 3": {"tau": 1.5, "matched_plain": 4, "runs": 4},
               "min_match 4": {"tau": 1.4, "matched_plain": 4, "runs": 4}}
    assert tune_hybrid.choose(summary, [2, 3, 4]) == 3  # a tie: the larger, which replaces the draft less often
    summary["min_match 4"]["matched_plain"] = 3  # control: an output that differs from plain stops the choice
    assert tune_hybrid.choose(summary, [2, 3, 4]) is None
    for name in ("mt-bench", "humaneval", "sharegpt-heldout"):
        with pytest.raises(SystemExit, match="reported on"):
            tune_hybrid.main(["--prompts", name])
