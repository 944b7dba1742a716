"""The EAGLE-3 script pair on a tiny local target: fused-feature data -> TTT training -> export,
online training without stored features, regenerated data, and clear errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import generate_data_fused_features
from modules.draft.loading import load_draft
from modules.draft.eagle3_draft import Eagle3Draft
from train import train_eagle_ttt
from tests._helpers_data import chat_rows, tiny_target_dir, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("e3scripts")
    model = tiny_target_dir(base / "model", layers=4)
    rows = write_jsonl(base / "rows.jsonl", chat_rows(10))
    data = base / "data"
    rc = generate_data_fused_features.main(["--model", model, "--dataset", rows, "--outdir", str(data),
                                            "--max-length", "384", "--no-progress", "--dtype", "fp32"])
    assert rc == 0
    return base, model, rows, data


def test_fused_data_has_the_official_layers(tiny):
    base, model, rows, data = tiny
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["aux_layers"] == [2, 2, 1]  # [2, N//2, N-3] for N = 4
    shard = sorted(data.glob("shard-*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor("aux_hidden_states").shape[-1] == 3 * f.get_tensor("hidden_states").shape[-1]


def test_offline_ttt_training_and_export(tiny, tmp_path):
    base, model, rows, data = tiny
    out = tmp_path / "run"
    rc = train_eagle_ttt.main(["--model", model, "--data", str(data), "--output-dir", str(out), "--max-steps", "4",
                               "--ttt-steps", "3", "--eval-fraction", "0.2", "--grad-accum", "1",
                               "--draft-vocab-coverage", "0.9", "--logging-steps", "2", "--save-steps", "100"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval_step2_acc" in summary and summary["draft_vocab_coverage"] >= 0.9
    assert (out / "training_curves.png").is_file()
    history = json.loads((out / "log_history.json").read_text())
    assert any("step2_acc" in h for h in history)
    draft = load_draft(out / "draft", target_model=model)
    assert isinstance(draft, Eagle3Draft) and draft.aux_layers == [2, 2, 1]
    assert draft.lm_head.out_features < draft.config.vocab_size  # a reduced draft vocabulary


def test_profile_steps_writes_the_op_table(tiny, tmp_path):
    """--profile-steps 2: steps 3-4 profiled (after the 2 warm-up steps), the op table in profile.txt;
    without the flag no file (the control)."""
    base, model, rows, data = tiny
    common = ["--model", model, "--data", str(data), "--max-steps", "5", "--ttt-steps", "2", "--eval-fraction", "0",
              "--grad-accum", "1", "--save-steps", "100", "--no-export"]
    assert train_eagle_ttt.main(common + ["--output-dir", str(tmp_path / "on"), "--profile-steps", "2"]) == 0
    table = (tmp_path / "on" / "profile.txt").read_text()
    assert table.startswith("torch.profiler: optimizer steps 3-4 (2 steps)")
    assert "aten::" in table and "Self CPU" in table
    assert train_eagle_ttt.main(common + ["--output-dir", str(tmp_path / "off")]) == 0
    assert not (tmp_path / "off" / "profile.txt").exists()


def test_online_training_needs_no_feature_files(tiny, tmp_path):
    base, model, rows, data = tiny
    out = tmp_path / "online"
    rc = train_eagle_ttt.main(["--model", model, "--online", "--dataset", rows, "--start", "0", "--end", "8",
                               "--output-dir", str(out), "--max-steps", "3", "--ttt-steps", "2",
                               "--eval-fraction", "0.25", "--grad-accum", "1", "--max-length", "384",
                               "--target-dtype", "fp32"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["online"] and summary["steps"] == 3
    assert not list(out.rglob("shard-*.safetensors"))


@pytest.mark.parametrize("arch", ["eagle3", "peagle"])
def test_eagle31_norms_train_export_and_decode_losslessly(tiny, tmp_path, arch):
    """--eagle31-norms: the trained draft carries input_norm and the config fields vLLM reads (the export keeps
    them: tests/test_export_eagle3.py), and our decoder with it equals plain greedy."""
    from modules.decode.parallel import make_decoder
    from modules.draft.kinds import kind_of
    from modules.target import load_target

    base, model, rows, data = tiny
    out = tmp_path / arch
    rc = train_eagle_ttt.main(["--arch", arch, "--model", model, "--data", str(data), "--output-dir", str(out),
                               "--max-steps", "3", "--ttt-steps", "2", "--eval-fraction", "0.2", "--grad-accum", "1",
                               "--save-steps", "100", "--eagle31-norms", "--precision", "fp32"])
    assert rc == 0
    cfg = json.loads((out / "draft" / "config.json").read_text())
    assert cfg["norm_before_fc"] is True and cfg["norm_output"] is True
    target, tokenizer = load_target(model, dtype="fp32")
    draft = load_draft(out / "draft", target_model=model).eval()
    assert draft.input_norm is not None and draft.norm_output
    ids = tokenizer("What is the capital of France?")["input_ids"]
    plain = target.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    decoder = make_decoder(target, kind_of(draft).tree_adapter(draft), total_tokens=8, depth=4, top_k=2)
    assert decoder.generate(ids, 24).tokens == plain


def test_eagle2_arch_with_ttt(tiny, tmp_path):
    base, model, rows, data = tiny
    out = tmp_path / "e2"
    rc = train_eagle_ttt.main(["--arch", "eagle2", "--model", model, "--data", str(data), "--output-dir", str(out),
                               "--max-steps", "2", "--ttt-steps", "2", "--eval-fraction", "0.2", "--grad-accum", "1"])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["arch"] == "eagle2"


@pytest.mark.parametrize("arch,cls", [("peagle", "PEagleDraft"), ("dflash", "DFlashDraft")])
def test_parallel_arch_trains_its_block_and_resumes(tiny, tmp_path, arch, cls):
    """--arch peagle|dflash: the unroll is the block (--parallel-tokens), not --ttt-steps; simulated tau over the
    block; the saved draft is of the kind; --resume auto continues from the last checkpoint."""
    base, model, rows, data = tiny
    out = tmp_path / arch
    common = ["--arch", arch, "--parallel-tokens", "3", "--ttt-steps", "7", "--model", model, "--data", str(data),
              "--output-dir", str(out), "--eval-fraction", "0.2", "--grad-accum", "1", "--save-steps", "2"]
    assert train_eagle_ttt.main(common + ["--max-steps", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == arch and summary["ttt_steps"] == 3
    assert "eval_step2_acc" in summary and "eval_step3_acc" not in summary and "eval_tau_sim" in summary
    draft = load_draft(out / "draft", target_model=model)
    assert type(draft).__name__ == cls and draft.parallel_tokens == 3
    assert train_eagle_ttt.main(common + ["--max-steps", "4", "--resume", "auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_clear_error_on_data_without_fused_features(tiny, tmp_path, capsys):
    base, model, rows, data = tiny
    from generate_data import main as generate_plain
    plain = tmp_path / "plain"
    assert generate_plain(["--model", model, "--dataset", rows, "--outdir", str(plain), "--end", "3",
                           "--max-length", "384", "--no-progress", "--dtype", "fp32"]) == 0
    rc = train_eagle_ttt.main(["--model", model, "--data", str(plain), "--output-dir", str(tmp_path / "x")])
    assert rc == 2
    assert "no fused features" in capsys.readouterr().err


def test_regenerated_data(tiny, tmp_path):
    base, model, rows, data = tiny
    out = tmp_path / "regen"
    rc = generate_data_fused_features.main(["--model", model, "--dataset", rows, "--outdir", str(out), "--end", "4",
                                            "--max-length", "384", "--no-progress", "--dtype", "fp32", "--regenerate",
                                            "--max-new-tokens", "6", "--regen-batch-size", "2"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["regenerated"]["temperature"] == 0.8 and manifest["aux_layers"] == [2, 2, 1]
    cache = list(out.glob("regenerated-*.jsonl"))
    assert len(cache) == 1
    original = [json.loads(x) for x in Path(rows).read_text().splitlines()][:4]
    regenerated = [json.loads(x)["row"] for x in cache[0].read_text().splitlines()]
    assert len(regenerated) == 4
    # user turns are kept, assistant turns are the target's (at most 6 new tokens each)
    for orig, new in zip(original, regenerated):
        users = [t["value"] for t in orig["conversations"] if t["from"] == "human"]
        assert [m["content"] for m in new["messages"] if m["role"] == "user"] == users[:len(
            [m for m in new["messages"] if m["role"] == "user"])]
        replies = [m["content"] for m in new["messages"] if m["role"] == "assistant"]
        old = [t["value"] for t in orig["conversations"] if t["from"] == "gpt"]
        assert replies != old[:len(replies)]


@pytest.mark.parametrize("attn, expected", [("eager", "eager"), ("auto", "sdpa")])
def test_attn_flag_chooses_the_ttt_attention(tiny, tmp_path, monkeypatch, attn, expected):
    from modules.draft import ttt_attention
    calls = {"eager": 0, "sdpa": 0}
    for impl, name in (("eager", "ttt_scores_softmax_output"), ("sdpa", "ttt_sdpa_output")):
        def counted(*a, _f=getattr(ttt_attention, name), _impl=impl, **kw):
            calls[_impl] += 1
            return _f(*a, **kw)
        monkeypatch.setattr(ttt_attention, name, counted)
    rc = train_eagle_ttt.main(["--model", tiny[1], "--data", str(tiny[3]), "--output-dir", str(tmp_path / "run"),
                               "--max-steps", "1", "--ttt-steps", "2", "--eval-fraction", "0", "--grad-accum", "1",
                               "--attn", attn, "--no-export"])
    assert rc == 0
    assert calls[expected] > 0 and sum(calls.values()) == calls[expected], calls


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, message", [
    (["--online", "--engine", "vllm", "--engine-url", "URL"], "no feature server reachable at http://127.0.0.1:"),
    (["--online", "--engine", "vllm", "--regenerate"], "dataset's replies only"),
    (["--engine", "vllm"], "--engine vllm feeds --online training"),
    (["--online", "--engine-url", "URL"], "--engine-url needs --engine vllm"),
])
def test_engine_fed_online_clear_errors(tiny, tmp_path, capsys, extra, message):
    """--online --engine vllm (features from a feature server, modules/data/feature_server.py): what it refuses, with
    one line. The real engine runs in tests/test_training_engine_online.py (make test-vllm)."""
    base, model, rows, data = tiny
    extra = [f"http://127.0.0.1:{_free_port()}" if x == "URL" else x for x in extra]  # nothing listens there
    rc = train_eagle_ttt.main(["--model", model, "--dataset", rows, "--end", "4", "--max-length", "384",
                               "--output-dir", str(tmp_path / "run"), "--max-steps", "1", *extra])
    assert rc == 2 and message in capsys.readouterr().err


def test_engine_lost_during_evaluation_keeps_the_trained_draft(tiny, tmp_path, capsys, monkeypatch):
    """A feature server that goes away after training (evaluation asks it for features too) ends the run with one
    line and exit code 2, and the trained draft and summary.json are saved first: the training is not lost."""
    from modules.data.feature_server import FeatureServerError
    from modules.training.ttt_trainer import TTTTrainer

    train, evaluate, trained = TTTTrainer.train, TTTTrainer.evaluate, []

    def train_then_lose_the_server(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        trained.append(True)
        return result

    def evaluate_without_a_server(self, *args, **kwargs):
        if trained:  # evaluations inside training still work; the final one finds the server gone
            raise FeatureServerError("no feature server reachable at http://127.0.0.1:1 (connection refused)")
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(TTTTrainer, "train", train_then_lose_the_server)
    monkeypatch.setattr(TTTTrainer, "evaluate", evaluate_without_a_server)
    base, model, rows, data = tiny
    out = tmp_path / "run"
    rc = train_eagle_ttt.main(["--model", model, "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                               "--ttt-steps", "2", "--eval-fraction", "0.2", "--grad-accum", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: evaluation failed after training (no feature server reachable" in err, err
    assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not any(k.startswith("eval_") for k in summary)
    assert isinstance(load_draft(out / "draft", target_model=model), Eagle3Draft)


def test_engine_server_that_fails_to_start_is_reported(tiny, tmp_path, capsys):
    """--engine vllm without --engine-url starts serve_features.py; a server that exits before it is ready (here:
    no vLLM in this environment) ends training with the server's own error, quoted from its log."""
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: the server would start (tests/test_training_engine_online.py)")
    base, model, rows, data = tiny
    out = tmp_path / "run"
    rc = train_eagle_ttt.main(["--model", model, "--dataset", rows, "--end", "4", "--max-length", "384", "--online",
                               "--engine", "vllm", "--engine-port", str(_free_port()), "--output-dir", str(out),
                               "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "the feature server exited with code 2 before it was ready" in err, err
    assert "needs vLLM installed" in err
    assert len(list(out.glob("feature_server-*.log"))) == 1
