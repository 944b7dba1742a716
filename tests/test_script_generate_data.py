"""generate_data.py on a tiny local target: resume after a kill is bit-identical, clear errors, view."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._helpers_data import chat_rows, tiny_target_dir, write_jsonl
import generate_data
import view_data
from modules.data.storage import EagleDataset, list_shards, read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    model = tiny_target_dir(base / "model")
    rows = chat_rows(24)
    rows[3] = {"id": "bad", "conversations": []}                      # skipped: empty
    rows[7] = {"id": "bad", "conversations": [{"from": "robot", "value": "x"}]}  # skipped: unknown role
    return model, write_jsonl(base / "rows.jsonl", rows)


def gen_cmd(model, data, outdir, *extra):
    return [sys.executable, "generate_data.py", "--model", model, "--dataset", data, "--outdir", str(outdir),
            "--rows-per-shard", "3", "--batch-tokens", "1024", "--max-length", "384", "--threads", "1",
            "--dtype", "fp32", "--no-progress", *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


def main_in_process(module, argv, capsys):
    """(exit code, stdout, stderr) of a script's main() run here: no interpreter start-up per case."""
    threads = torch.get_num_threads()
    try:
        code = module.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_resume_after_kill_is_bit_identical(tiny, tmp_path, capsys):
    model, data = tiny
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main_in_process(generate_data, gen_cmd(model, data, full)[2:], capsys)[0] == 0

    # Kill -9 a second run while it pauses after its second shard, then leave a half-written file.
    env = dict(os.environ, EAGLE_DATA_SHARD_DELAY="30")
    proc = subprocess.Popen(gen_cmd(model, data, resumed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and (not resumed.is_dir() or len(list_shards(resumed)) < 2):
        time.sleep(0.1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_at_kill = len(list_shards(resumed))
    assert 2 <= shards_at_kill < 8 and not read_manifest(resumed)["complete"]
    (resumed / "shard-00000021-00000024.safetensors.tmp").write_bytes(b"half")

    code, _, err = main_in_process(generate_data, gen_cmd(model, data, resumed)[2:], capsys)
    assert code == 0, err
    names = [p.name for p in list_shards(full)]
    assert names == [p.name for p in list_shards(resumed)] and len(names) == 8
    for name in names:
        assert (full / name).read_bytes() == (resumed / name).read_bytes(), name
    assert (full / "manifest.json").read_text() == (resumed / "manifest.json").read_text()
    # A third run finds the folder complete and stops before loading the weights.
    code, out, _ = main_in_process(generate_data, gen_cmd(model, data, resumed)[2:], capsys)
    assert code == 0 and "already complete" in out

    m = read_manifest(full)
    assert m["complete"] and m["rows_written"] == 22 and m["skipped"] == {"empty": 1, "unknown_role": 1}
    assert m["start_row"] == 0 and m["end_row"] == 24 and m["hidden_size"] == 64 and m["dtype"] == "bfloat16"
    assert m["truncated"] >= 1  # some 3-turn rows exceed 384 tokens
    ds = EagleDataset(full)
    assert len(ds) == 22 and max(ds.lengths) == 384
    assert [ds[i]["row_id"] for i in range(4)] == [0, 1, 2, 4]


def test_stored_feature_equals_forward_and_no_padding(tiny, tmp_path, capsys):
    from modules.data.features import target_features
    from modules.target import load_target

    model_dir, data = tiny
    out = tmp_path / "out"
    cmd = gen_cmd(model_dir, data, out, "--end", "6", "--store-dtype", "fp32")[2:]
    code, _, err = main_in_process(generate_data, cmd, capsys)
    assert code == 0, err
    ds = EagleDataset(out)
    model, tok = load_target(model_dir, dtype="fp32", device="cpu")
    assert ds.manifests[0]["tokens"] == int(ds.lengths.sum())  # only real tokens stored
    for item in ds:
        last, _ = target_features(model, item["input_ids"][None])
        torch.testing.assert_close(item["hidden_states"], last[0], rtol=1e-4, atol=1e-5)


def test_clear_errors(tiny, tmp_path, capsys):
    model, data = tiny

    def gen(outdir, *extra):
        return main_in_process(generate_data, gen_cmd(model, data, tmp_path / outdir, *extra)[2:], capsys)

    cases = [
        (["--model", str(tmp_path / "nope")], "model path not found"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "dataset file not found"),
        (["--start", "5", "--end", "5"], "empty row range"),
        (["--start", "100"], "no rows in range"),
        (["--chat-template", str(tmp_path / "none.jinja")], "chat template file not found"),
    ]
    for extra, message in cases:
        code, _, err = gen("o", *extra)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    # Rerunning into a folder made with other settings refuses instead of mixing data.
    assert gen("o2", "--end", "3")[0] == 0
    code, _, err = gen("o2", "--end", "3", "--max-length", "50")
    assert code == 2 and "max_length" in err
    # An out dir that cannot be written.
    (tmp_path / "file").write_text("x")
    code, _, err = gen("file/sub")
    assert code == 2 and "cannot write to out dir" in err


def test_model_without_chat_template(tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tiny_target_dir(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = None
    (Path(model) / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(model)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2))
    code, _, err = main_in_process(generate_data, gen_cmd(model, data, tmp_path / "o")[2:], capsys)
    assert code == 2 and "--chat-template" in err
    assert not list((tmp_path / "o").glob("shard-*"))


def test_view_data(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "v"
    assert main_in_process(generate_data, gen_cmd(model, data, out, "--end", "3")[2:], capsys)[0] == 0
    cmd = ["--data", str(out), "--index", "1", "--html", str(tmp_path / "v.html")]
    code, stdout, err = main_in_process(view_data, cmd, capsys)
    assert code == 0, err
    assert "\033[32m" in stdout and "\033[31m" in stdout and "hidden_states (" in stdout
    page = (tmp_path / "v.html").read_text()
    assert 'class="t"' in page and 'class="u"' in page
    code, _, err = main_in_process(view_data, ["--data", str(out), "--index", "99"], capsys)
    assert code == 2 and "out of range" in err
