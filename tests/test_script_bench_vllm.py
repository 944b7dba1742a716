"""benchmark/bench_vllm.py without vLLM: --baselines reuses plain and ngram only from a run that measured the same."""
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
    assert reused["plain"]["outputs"] == [[1, 2]] and "speedup_vs_vllm_plain" not in reused["plain"]
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
