"""benchmark/bench_learning_curve.py end to end on a tiny target (real training subprocesses, real decoding),
and --train-conversations, the training setting it is built on."""
import json

import pytest
import torch

from tests._helpers_decode import one_thread  # noqa: F401 (autouse: restores torch threads)
from tests._helpers_eagle import save_tiny_chat_target, write_fake_data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer (MT-bench prompts need its chat template) and 14
    conversations of its features."""
    _, tokenizer = smollm2
    root = tmp_path_factory.mktemp("curve")
    model = save_tiny_chat_target(root / "target", tokenizer)
    write_fake_data(root / "data", model, model_name=str(root / "target"), n=14)
    return root


def test_split_keeps_eval_and_nests_training_subsets(tiny_run):
    from modules.data.storage import EagleDataset
    from modules.training.setup import UsageError, split

    ds = EagleDataset(tiny_run / "data", read_aux=False)
    full_train, full_eval = split(ds, 4 / 14, seed=0)
    small_train, small_eval = split(ds, 4 / 14, seed=0, train_conversations=3)
    assert small_eval.indices == full_eval.indices and len(full_eval.indices) == 4
    assert small_train.indices == full_train.indices[:3]
    assert not set(small_train.indices) & set(small_eval.indices)
    with pytest.raises(UsageError, match="only 10 training conversations"):
        split(ds, 4 / 14, seed=0, train_conversations=11)


def test_token_pairs_reads_the_asked_conversations(tiny_run):
    from modules.data.storage import EagleDataset

    ds = EagleDataset(tiny_run / "data", read_aux=False)
    pairs = list(ds.token_pairs([5, 2]))
    assert torch.equal(pairs[0][0], ds[5]["input_ids"]) and torch.equal(pairs[1][1], ds[2]["loss_mask"])
    assert len(list(ds.token_pairs())) == len(ds)


def test_learning_curve_end_to_end(tiny_run, tmp_path, capsys):
    from benchmark import bench_learning_curve

    result = tmp_path / "curve.json"
    argv = ["--model", str(tiny_run / "target"), "--data", f"fake={tiny_run / 'data'}", "--archs", "eagle2",
            "--conversations", "4", "8", "40", "--epochs", "1", "--eval-conversations", "4", "--questions", "1",
            "--max-new-tokens", "8", "--tree", "4", "2", "2", "--max-length", "64",
            "--out", str(tmp_path / "runs"), "--result", str(result)]
    assert bench_learning_curve.main(argv) == 0
    saved = json.loads(result.read_text())
    assert result.with_suffix(".png").stat().st_size > 1000
    assert saved["skipped"] == ["fake eagle2 40: the data holds 10 training conversations"]
    cells = {c["conversations"]: c for c in saved["cells"]}
    assert set(cells) == {4, 8}
    for n, c in cells.items():
        assert c["steps"] == n // 4  # one epoch, 4 conversations per optimizer step
        assert c["matched_plain"] == c["hybrid_matched_plain"] == c["turns"] == 2  # lossless on both MT-bench turns
        assert c["hybrid_mt_bench_tau"] >= 1.0 and c["draft_ms_per_cycle"] > 0 and c["hybrid_draft_ms_per_cycle"] > 0
        assert c["mt_bench_tau"] >= 1.0 and c["eval_tau_sim"] >= 1.0
        run_config = json.loads((tmp_path / "runs" / f"fake-eagle2-{n}" / "run_config.json").read_text())
        assert run_config["train_conversations"] == n
    assert 0 < cells[4]["training_tokens"] < cells[8]["training_tokens"]
    assert str(tiny_run) not in result.read_text()  # no machine paths in the result
    assert "MT tau" in capsys.readouterr().out

    # A rerun does nothing again: trainings and measurements are kept.
    assert bench_learning_curve.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("done earlier") == 2 and "plain greedy first" not in again

    # --report-only: a bigger planned grid, reported as far as it is done; nothing is trained.
    bigger = [a if a != "40" else "9" for a in argv] + ["--report-only"]
    assert bench_learning_curve.main(bigger) == 0
    saved = json.loads(result.read_text())
    assert {c["conversations"] for c in saved["cells"]} == {4, 8}
    assert saved["skipped"] == ["fake eagle2 9: not run"]
    assert not (tmp_path / "runs" / "fake-eagle2-9").exists()

    # --prompts: the same cells measured on another prompt set, kept apart; nothing is retrained.
    humaneval = tmp_path / "curve_humaneval.json"
    code_argv = [a if a != str(result) else str(humaneval) for a in argv] + ["--prompts", "humaneval"]
    mt_file = tmp_path / "runs" / "fake-eagle2-4" / "mt_bench.json"
    mt_before = mt_file.read_text()
    assert bench_learning_curve.main(code_argv) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 2 and "humaneval: 1 questions" in out
    saved = json.loads(humaneval.read_text())
    for c in saved["cells"]:
        assert c["prompts"] == "humaneval" and "mt_bench_tau" not in c
        assert c["matched_plain"] == c["hybrid_matched_plain"] == c["turns"] == 1  # one turn, lossless
        assert c["humaneval_tau"] >= 1.0 and c["hybrid_humaneval_tau"] >= 1.0
    assert (tmp_path / "runs" / "fake-eagle2-4" / "humaneval.json").is_file()
    assert mt_file.read_text() == mt_before  # the MT-bench measurement is kept as it was


def test_bad_data_spec_is_a_clear_error(capsys):
    from benchmark import bench_learning_curve

    with pytest.raises(SystemExit):
        bench_learning_curve.parse_args(["--data", "/no/name/given"])
    assert "expected NAME=FOLDER" in capsys.readouterr().err

