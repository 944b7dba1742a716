"""Regeneration at scale: the rows of a distributed job are split over its ranks (one resumable file
per rank, then every rank reads all of them), and with --server-url the data script loads the target
only once the server has written every reply."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import generate_data_fused_features
from modules import target as target_module
from modules.data.regenerate import (RegenerationError, rank_cache_file, read_cache, regenerate_rows,
                                regenerate_sharded)
from tests._helpers_data import chat_rows, tiny_target_dir, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ROWS = [(r, {"messages": [{"role": "user", "content": f"question {r}"}, {"role": "assistant", "content": "old"}]})
        for r in range(10, 17)]


class Echo:
    """Replies 'reply to <question>'; records the questions it was asked (and checks a hook first)."""

    def __init__(self, before_each=None):
        self.asked, self.before_each = [], before_each

    def __call__(self, convs):
        if self.before_each:
            self.before_each()
        self.asked += [c[-1]["content"] for c in convs]
        return [f"reply to {c[-1]['content']}" for c in convs]


def test_ranks_share_the_rows_and_all_get_every_row(tmp_path):
    gens, results = [Echo(), Echo(), Echo()], [None] * 3

    def rank(r):
        results[r] = regenerate_sharded(ROWS, gens[r], tmp_path, "regen", rank=r, world=3, progress=False,
                                        poll_seconds=0.05)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    asked = [sorted(int(q.split()[-1]) for q in g.asked) for g in gens]
    assert asked == [[10, 13, 16], [11, 14], [12, 15]]  # each row regenerated once, by one rank
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"regen.rank{r:03d}-of-003.jsonl" for r in range(3)]
    assert [sorted(read_cache(rank_cache_file(tmp_path, "regen", r, 3))) for r in range(3)] == asked
    single = regenerate_rows(ROWS, Echo(), progress=False)
    assert results[0] == results[1] == results[2] == single  # every rank trains on all rows, in order


def test_a_rank_file_appears_only_when_complete_and_a_killed_rank_resumes(tmp_path):
    final = rank_cache_file(tmp_path, "regen", 1, 2)
    partial = final.with_name(final.name + ".partial")
    partial.write_text(json.dumps({"row_id": 11, "row": {"messages": [{"role": "user", "content": "kept"}]}})
                       + "\n" + '{"row_id": 13, "ro')  # a kill cut the second line
    rank_cache_file(tmp_path, "regen", 0, 2).write_text("")  # rank 0 done (with a file made for other rows)

    def not_final_yet():
        assert not final.exists(), "the rank file appeared before its share was done"

    gen = Echo(before_each=not_final_yet)
    with pytest.raises(RegenerationError, match="in none of the 2 rank files"):
        regenerate_sharded(ROWS, gen, tmp_path, "regen", rank=1, world=2, progress=False, poll_seconds=0.01)
    assert sorted(gen.asked) == ["question 13", "question 15"]  # row 11 came from the partial file
    assert final.is_file() and not partial.exists()
    assert read_cache(final)[11] == {"messages": [{"role": "user", "content": "kept"}]}
    # rank 0's empty file made the call above end in one clear error instead of training on a subset


def test_online_regeneration_under_two_ranks(tmp_path):
    """train_eagle_ttt.py --online --regenerate as ranks 0 and 1 of a 2-process job (RANK / WORLD_SIZE, as
    torchrun sets them), on a tiny target: disjoint rank files, and both ranks hold the same dataset."""
    model = tiny_target_dir(tmp_path / "model", layers=2)
    rows = write_jsonl(tmp_path / "rows.jsonl", chat_rows(6))
    out = tmp_path / "out"
    code = ("import json\nfrom train import train_eagle_ttt as t\n"
            f"args = t.parse_args(['--online', '--regenerate', '--model', {model!r}, '--dataset', {rows!r}, "
            f"'--start', '0', '--end', '6', '--max-new-tokens', '4', '--max-length', '256', "
            f"'--target-dtype', 'fp32', '--output-dir', {str(out)!r}])\n"
            "ds, _ = t.online_data(args)\n"
            "print('DATA', json.dumps([[it['row_id'], it['input_ids'].tolist()] for it in ds.items]))\n")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    files = sorted(p.name for p in out.glob("regenerated-*"))
    assert files == ["regenerated-0-6.rank000-of-002.jsonl", "regenerated-0-6.rank001-of-002.jsonl"]
    shares = [sorted(read_cache(out / f)) for f in files]
    assert shares == [[0, 2, 4], [1, 3, 5]]
    data = [json.loads(o.split("DATA ", 1)[1]) for o in outputs]
    assert data[0] == data[1] and len(data[0]) >= 4


class FakeServer(BaseHTTPRequestHandler):
    events = None  # the test's event list

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.events.append("server reply")
        data = json.dumps({"choices": [{"message": {"content": f"served: {body['messages'][-1]['content'][:20]}"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


def test_server_regeneration_loads_the_target_only_for_the_features(tmp_path, monkeypatch):
    events = []
    real_load = target_module.load_target_model

    def recording_load(*args, **kwargs):
        events.append("target loaded")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(target_module, "load_target_model", recording_load)
    FakeServer.events = events
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    model = tiny_target_dir(tmp_path / "model", layers=4)
    rows = write_jsonl(tmp_path / "rows.jsonl", chat_rows(4))
    out = tmp_path / "data"
    cmd = ["--model", model, "--dataset", rows, "--outdir", str(out), "--max-length", "256", "--no-progress",
           "--dtype", "fp32", "--regenerate", "--server-url", f"http://127.0.0.1:{server.server_port}/v1"]
    try:
        # one pass: every reply from the server first, then the target for the features
        assert generate_data_fused_features.main(cmd) == 0
        assert events.count("target loaded") == 1 and events[-1] == "target loaded"
        assert events.count("server reply") >= 4
        # --regenerate-only: the server's replies, no target at all (the server keeps the GPUs to itself)
        events.clear()
        assert generate_data_fused_features.main(cmd + ["--outdir", str(tmp_path / "two"), "--regenerate-only"]) == 0
        assert "target loaded" not in events and events.count("server reply") >= 4
        assert list((tmp_path / "two").glob("regenerated-*.jsonl"))
        assert not (tmp_path / "two" / "manifest.json").exists()
    finally:
        server.shutdown()
    # ... then the same command without it, server gone: features from the kept replies
    events.clear()
    assert generate_data_fused_features.main(cmd + ["--outdir", str(tmp_path / "two")]) == 0
    assert events == ["target loaded"]
    for folder in (out, tmp_path / "two"):
        (cache,) = folder.glob("regenerated-*.jsonl")
        replies = [m["content"] for line in cache.read_text().splitlines()
                   for m in json.loads(line)["row"]["messages"] if m["role"] == "assistant"]
        assert replies and all(r.startswith("served: ") for r in replies)
        assert json.loads((folder / "manifest.json").read_text())["rows_written"] >= 3
