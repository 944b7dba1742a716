"""benchmark/bench_vllm.py without vLLM: --baselines reuses plain and ngram only from a run that measured the same;
the rounds (each method once a round, each in its own process, the order rotated) and their summary, with the
method processes faked."""
import json

import pytest

from benchmark import bench_vllm


def earlier_run(tmp_path):
    args = bench_vllm.parse_args(["--prompts", "sharegpt-heldout", "--num-spec-tokens", "4"])
    result = {"outputs": [[1, 2]], "seconds": 2.0, "tokens": 2, "counters": {"num_drafts": 0},
              "label": "x", "tokens_per_s": 1.0, "speedup_vs_vllm_plain": 1.0, "outputs_equal_plain": 1}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"settings": bench_vllm.report_settings(args),
                                "results": {"plain": result, "ngram": result, "draft": result}}))
    return path


def test_baselines_reused_from_the_same_settings_only(tmp_path):
    path = earlier_run(tmp_path)
    args = bench_vllm.parse_args(["--prompts", "sharegpt-heldout", "--num-spec-tokens", "4", "--draft", "other",
                                  "--baselines", str(path)])
    reused = bench_vllm.load_baselines(args)
    assert sorted(reused) == ["ngram", "plain"]  # the draft's own result is never reused
    [plain] = reused["plain"]  # a file written before --rounds: one round
    assert plain["outputs"] == [[1, 2]] and plain["from_baselines"] and "speedup_vs_vllm_plain" not in plain
    # controls: another prompt set, another number of speculative tokens
    for argv in (["--prompts", "mt-bench", "--num-spec-tokens", "4"], ["--prompts", "sharegpt-heldout"]):
        with pytest.raises(SystemExit, match="other settings"):
            bench_vllm.load_baselines(bench_vllm.parse_args([*argv, "--baselines", str(path)]))


def test_a_draft_alone_is_still_reported_against_the_lent_plain_run(tmp_path):
    """--methods draft --baselines FILE: plain and n-gram come from FILE and stand beside the draft, so its
    speedup and output check are computed (they were left out, silently)."""
    args = bench_vllm.parse_args(["--prompts", "sharegpt-heldout", "--num-spec-tokens", "4", "--methods", "draft",
                                  "--baselines", str(earlier_run(tmp_path))])
    reused = bench_vllm.load_baselines(args)
    assert bench_vllm.reported_methods(args, reused) == ["plain", "ngram", "draft"]
    assert bench_vllm.reported_methods(bench_vllm.parse_args(["--methods", "draft"]), {}) == ["draft"]


def raw(seconds, outputs=((1, 2, 3), (4, 5)), accepted=0, drafts=0):
    """A method's raw result of one round, as run_vllm returns it."""
    return {"outputs": [list(o) for o in outputs], "seconds": seconds, "tokens": 50, "label": "x",
            "counters": {"num_drafts": drafts, "num_draft_tokens": 3 * drafts, "num_accepted_tokens": accepted,
                         "accepted_per_pos": [accepted, 0, 0] if drafts else []}}


def test_rounds_run_every_method_once_a_round_in_a_rotated_order(monkeypatch, capsys, tmp_path):
    calls = []
    seconds = {"plain": [2.0, 4.0, 2.0], "ngram": [1.6, 3.2, 1.6], "draft": [1.0, 2.0, 1.0]}  # round 2: a slow one

    def fake(method, argv):
        calls.append(method)
        n = sum(c == method for c in calls) - 1
        return raw(seconds[method][n], accepted=0 if method == "plain" else 20,
                   drafts=0 if method == "plain" else 25) | {"label": f"vLLM {method}"}

    monkeypatch.setattr(bench_vllm, "run_in_subprocess", fake)
    methods = ["plain", "ngram", "draft"]
    rounds = bench_vllm.run_rounds([], methods, 3)
    assert calls == ["plain", "ngram", "draft", "ngram", "draft", "plain", "draft", "plain", "ngram"]
    results = bench_vllm.summarize(methods, rounds)
    d = results["draft"]
    assert d["tokens_per_s"] == 50.0 and d["tokens_per_s_range"] == [25.0, 50.0]
    assert d["speedup_vs_vllm_plain"] == 2.0 and d["speedup_range"] == [2.0, 2.0]  # within each round
    assert d["acceptance_length"] == 1.8 and d["outputs_equal_plain"] == 2 and d["rounds_agree"]
    assert d["suspicious"] is True  # 2.0x with 1.8 tokens per cycle, no spread: flagged
    assert results["ngram"]["suspicious"] is False  # 1.25x at 1.8: fine
    assert [r["speedup_vs_vllm_plain"] for r in d["rounds"]] == [2.0, 2.0, 2.0]
    bench_vllm.print_table(results, 2, 3)
    out = capsys.readouterr().out
    assert "[25.0..50.0]" in out and "(!) draft" in out
    bench_vllm.plot(results, tmp_path / "r.png", 3)
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_a_draft_measured_against_lent_baselines_says_they_were_not_interleaved(tmp_path, monkeypatch):
    """The plain of an earlier run (three rounds of its own) lends its median: this run's speedup is not paired
    round by round, and the result says it came from --baselines."""
    settings = ["--prompts", "sharegpt-heldout", "--num-spec-tokens", "4"]
    earlier = [{"plain": raw(2.0), "ngram": raw(1.0, accepted=30, drafts=25)} for _ in range(3)]
    earlier[1]["plain"] = raw(2.5)
    results = bench_vllm.summarize(["plain", "ngram"], earlier)
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"settings": bench_vllm.report_settings(bench_vllm.parse_args(settings)),
                                "results": results}))
    args = bench_vllm.parse_args([*settings, "--methods", "draft", "--baselines", str(path)])
    reused = bench_vllm.load_baselines(args)
    assert [r["tokens_per_s"] for r in reused["plain"]] == [25.0, 20.0, 25.0]
    now = [{"draft": raw(s, accepted=10, drafts=25)} for s in (1.0, 1.25)]
    out = bench_vllm.summarize(bench_vllm.reported_methods(args, reused), now, reused)
    assert list(out) == ["plain", "ngram", "draft"]
    assert out["plain"]["from_baselines"] and "from_baselines" not in out["draft"]
    assert out["ngram"]["speedup_paired"] and out["ngram"]["speedup_range"] == [2.0, 2.5]  # its own run's rounds
    assert not out["draft"]["speedup_paired"] and out["draft"]["speedup_range"] == [1.6, 2.0]  # vs plain's median 25


def test_tokens_per_forward_counts_the_steps_that_drafted_nothing():
    from benchmark.bench_vllm import describe

    # n-gram drafted in 10 of the 80 steps and had 20 tokens accepted: 2.0 per drafting step, 1.25 per forward
    ngram = describe({"outputs": [[0] * 100], "seconds": 1.0, "tokens": 100,
                      "counters": {"num_drafts": 10, "num_draft_tokens": 30, "num_accepted_tokens": 20}}, None)
    assert ngram["acceptance_length"] == 3.0
    assert ngram["tokens_per_forward"] == 100 / 80
    plain = describe({"outputs": [[0] * 100], "seconds": 1.0, "tokens": 100, "counters": {"num_drafts": 0}}, None)
    assert plain["tokens_per_forward"] == 1.0 and "acceptance_length" not in plain
