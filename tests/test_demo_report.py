"""modules/demo_report.py: the benchmark's rounds and the vLLM stage in the report, from files alone (the stages'
outputs faked at the file level; the real stages run in `make demo`), and demo.py's stage commands with and
without .venv-vllm."""
import json
import sys

import demo
from benchmark import bench_vllm
from modules.demo_report import ADD_VLLM, write_report

SECONDS = {"data": 300.0, "train": 1000.0, "benchmark": 180.0}


def fake_benchmark(out, eagle_tps=(24.0, 20.0, 25.0), plain_tps=(20.0, 18.0, 21.0), tau=1.3):
    """OUT/benchmark/results.json as bench_eagle.py writes it, with made-up per-round figures."""
    from benchmark.rounds import combine, rounds_note

    def rounds(tps, tau):
        return [{"tokens_per_s": t, "seconds": 384 / t, "runs": 8, "matched_plain": 8, "tau": tau} for t in tps]

    summary = combine({"plain": rounds(plain_tps, None), "eagle": rounds(eagle_tps, tau)},
                      timing=("seconds", "tokens_per_s", "speedup"), tau_key="tau")
    path = out / "benchmark" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"settings": {"rounds": 3}, "note": rounds_note(summary, 3), "summary": summary}))


def fake_vllm(out, draft_seconds):
    """OUT/vllm/results.json as bench_vllm.py writes it (its summary of made-up rounds; no engine)."""
    def raw(seconds, drafts=0, accepted=0, label="x"):
        return {"outputs": [[1, 2], [3]], "seconds": seconds, "tokens": 60, "label": label,
                "counters": {"num_drafts": drafts, "num_draft_tokens": 4 * drafts, "num_accepted_tokens": accepted,
                             "accepted_per_pos": [accepted, 0, 0, 0] if drafts else []}}

    methods = ["plain", "ngram", "draft", "hybrid"]
    rounds = [{"plain": raw(3.0, label="vLLM plain"), "ngram": raw(2.5, 40, 12, "vLLM ngram, 4 tokens"),
               "draft": raw(seconds, 40, 10, "vLLM eagle3, 4 tokens"),
               "hybrid": raw(2.2, 40, 20, "vLLM eagle3, 4 tokens + lookup rule 2")} for seconds in draft_seconds]
    args = bench_vllm.parse_args(["--rounds", str(len(rounds)), "--num-questions", "2", "--num-spec-tokens", "4"])
    results = bench_vllm.summarize(methods, rounds)
    path = out / "vllm" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"engine": "vllm 0.32.0", "settings": bench_vllm.report_settings(args), "prompts": 2,
                                "rounds": len(rounds), "note": bench_vllm.rounds_note(results, len(rounds)),
                                "results": results}))


def test_report_without_vllm_says_the_command_that_adds_it(tmp_path):
    fake_benchmark(tmp_path)
    report = write_report(tmp_path, SECONDS)
    # per round 24/20, 20/18, 25/21: the median of the ratios, not the ratio of the medians
    assert "| eagle | 24.0 [20.0..25.0] | 1.19x [1.11..1.20] | 1.30 | 8/8 (lossless) |" in report
    assert "median of 3 interleaved round(s)" in report and "(!)" not in report
    assert "## Served by vLLM: not run here" in report and f"`{ADD_VLLM}`" in report
    assert "## Beside it: the real engine" in report  # the recorded run stands in meanwhile


def test_report_with_the_demos_own_vllm_run(tmp_path):
    fake_benchmark(tmp_path)
    fake_vllm(tmp_path, draft_seconds=[2.0])
    report = write_report(tmp_path, SECONDS | {"export": 15.0, "vllm": 190.0})
    assert "## Served by vLLM: this demo's draft (vllm 0.32.0)" in report
    assert "| vLLM eagle3, 4 tokens | 30.0 [30.0..30.0] | 1.50x [1.50..1.50] (!) | 1.25 | 2/2 |" in report
    assert "| vLLM eagle3, 4 tokens + lookup rule 2 |" in report and "| vLLM ngram, 4 tokens |" in report
    assert "One round: the figures have no spread" in report  # the demo's budget: one round, said so
    assert "- vllm: 190 s" in report
    assert ADD_VLLM not in report and "## Beside it" not in report  # the demo's own run replaces the recorded one
    # control: three rounds, the draft at a believable speed: no flag, no one-round warning
    other = tmp_path / "three"
    other.mkdir()
    fake_benchmark(other)
    fake_vllm(other, draft_seconds=[2.8, 2.6, 3.0])
    report = write_report(other, SECONDS)
    assert "(!)" not in report and "One round" not in report
    assert "| vLLM eagle3, 4 tokens | 21.4 [20.0..23.1] | 1.07x [1.00..1.15] | 1.25 | 2/2 |" in report


def test_a_suspicious_benchmark_result_is_marked_in_the_report(tmp_path):
    # plain slowed in every round (another process): 2.0x at tau 1.3 is flagged
    fake_benchmark(tmp_path, eagle_tps=(24.0, 24.5, 25.0), plain_tps=(12.0, 12.2, 12.5))
    report = write_report(tmp_path, SECONDS)
    assert "| eagle | 24.5 [24.0..25.0] | 2.00x [2.00..2.01] (!) | 1.30 |" in report
    assert "(!) eagle: the median speedup exceeds tau" in report


def test_the_vllm_stages_run_only_with_vllm_installed(tmp_path):
    absent = demo.parse_args(["--out", str(tmp_path), "--vllm-python", str(tmp_path / "none")])
    assert list(demo.stage_commands(absent)) == ["data", "train", "benchmark"]
    assert demo.stage_commands(absent)["benchmark"][-4:-2] == ["--rounds", "3"]
    for arch, k in (("peagle", "4"), ("eagle3", "4")):  # P-EAGLE: its trained block; EAGLE-3: the tree's depth
        present = demo.parse_args(["--out", str(tmp_path), "--vllm-python", sys.executable, "--arch", arch,
                                   "--tree", "8", "4", "2", "--hybrid-min-match", "3"])
        stages = demo.stage_commands(present)
        assert list(stages) == ["data", "train", "benchmark", "export", "vllm"]
        export, vllm = stages["export"], stages["vllm"]
        assert export[export.index("--hybrid-lookup") + 1] == vllm[vllm.index("--hybrid-min-match") + 1] == "3"
        assert export[export.index("--output-dir") + 1] == vllm[vllm.index("--draft") + 1]
        assert vllm[0] == sys.executable and vllm[vllm.index("--num-spec-tokens") + 1] == k
        assert vllm[vllm.index("--methods") + 1:vllm.index("--hybrid-min-match")] == ["plain", "ngram", "draft",
                                                                                      "hybrid"]
        assert vllm[vllm.index("--rounds") + 1] == "1"
    shallow = demo.parse_args(["--out", str(tmp_path), "--vllm-python", sys.executable, "--arch", "eagle3",
                               "--tree", "6", "3", "2"])
    assert demo.spec_tokens(shallow) == 3  # control: the depth, not a constant
