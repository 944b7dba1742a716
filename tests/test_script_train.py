"""train/train.py end to end on a tiny target: from train/ as cwd, bad input (one line, exit 2),
and 2-process DDP on CPU (gloo) ending with the same weights on both ranks."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests._helpers_eagle import REPO_ROOT, save_tiny_target, write_fake_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_script")
    target = save_tiny_target(root / "target", "llama")
    write_fake_data(root / "data", target, model_name=str(root / "target"), n=8)
    return root, target


def _train_main():
    spec = importlib.util.spec_from_file_location("train_script", REPO_ROOT / "train" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


FAST = ["--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "2",
        "--save-steps", "2", "--sim-steps", "2", "--lr", "1e-3"]


def test_train_script_from_train_dir_exports_a_loadable_draft(setup):
    root, target = setup
    out = root / "run"
    r = subprocess.run([sys.executable, "train.py", "--model", str(root / "target"), "--data", str(root / "data"),
                        "--output-dir", str(out), "--eval-fraction", "0.25", *FAST],
                       cwd=REPO_ROOT / "train", env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 1.0 <= summary["eval_tau_sim"] <= 3.0
    assert 0.0 <= summary["eval_top1_acc"] <= 1.0
    assert {"config.json", "model.safetensors", "pytorch_model.bin"} <= set(os.listdir(out / "draft"))
    assert (out / "checkpoint-4" / "model.safetensors").exists()
    history = json.loads((out / "log_history.json").read_text())
    assert any("eval_tau_sim" in h for h in history) and any("top1_acc" in h for h in history)
    assert (out / "training_curves.png").stat().st_size > 10_000
    from modules.draft.loading import load_draft
    draft = load_draft(out / "draft")  # finds the target through config.target_model
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)


def _bad(main, capsys, argv):
    capsys.readouterr()  # drop earlier output (progress bars of the setup)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_input_is_one_clear_line(setup, tmp_path, capsys):
    root, target = setup
    main = _train_main()
    base = ["--model", str(root / "target"), "--output-dir", str(tmp_path / "o"), *FAST]
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in _bad(main, capsys, base + ["--data", str(tmp_path / "empty")])
    # data made for another target: the manifest names another model / another hidden size
    assert "generated for model 'meta-llama" in _bad(main, capsys, base + ["--data", str(_renamed(root, tmp_path))])
    save_tiny_target(tmp_path / "wide", "llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    err = _bad(main, capsys, ["--model", str(tmp_path / "wide"), "--output-dir", str(tmp_path / "o"), *FAST,
                              "--data", str(root / "data"), "--allow-other-model"])
    assert "hidden_size 64" in err and "32" in err
    # a corrupt shard is named
    shutil.copytree(root / "data", tmp_path / "corrupt")
    shard = next((tmp_path / "corrupt").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = _bad(main, capsys, base + ["--data", str(tmp_path / "corrupt")])
    assert shard.name in err


def _renamed(root, tmp_path):
    """A copy of the data whose manifest says it was made for another model."""
    dst = tmp_path / "other_model"
    shutil.copytree(root / "data", dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["model"] = "meta-llama/Llama-3.1-8B-Instruct"
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_ddp_two_cpu_processes_end_with_equal_weights(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "train/train.py", "--model", str(root / "target"), "--data", str(root / "data"),
           "--output-dir", str(out), "--eval-fraction", "0", "--no-export", "--dump-rank-weights",
           "--max-steps", "3", "--batch-size", "1", "--grad-accum", "2", "--logging-steps", "1",
           "--save-steps", "100", "--lr", "1e-3"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open
    for rank in (0, 1):  # really one DDP job of 2 ranks, not two independent runs
        with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
            assert f.metadata() == {"world_size": "2", "global_step": "3"}
    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert set(w0) == set(w1) and len(w0) > 0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # and training moved them away from the (seeded, identical) initialisation
    from modules.draft.eagle_draft import EagleDraft
    torch.manual_seed(0)
    init = EagleDraft.from_target(root / "target").trainable_state_dict(with_embed=False)
    assert not torch.equal(init["fc.weight"], w0["fc.weight"])


def test_nan_loss_exits_with_one_line_and_no_checkpoint(setup, tmp_path, capsys):
    root, target = setup
    from modules.data import storage
    from tests._helpers_eagle import fake_items

    items = fake_items(target, n=4)
    for it in items:
        it["hidden_states"] = torch.full_like(it["hidden_states"], float("nan"))
    (tmp_path / "nan").mkdir()
    storage.write_shard(tmp_path / "nan", 0, 4, items, skipped={})
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    storage.write_manifest(tmp_path / "nan", manifest)
    main = _train_main()
    capsys.readouterr()
    rc = main(["--model", str(root / "target"), "--data", str(tmp_path / "nan"), "--output-dir",
               str(tmp_path / "o"), "--eval-fraction", "0", *FAST])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]  # the rest is the progress bar
    assert rc == 3 and len(lines) == 1 and "Traceback" not in err
    assert "loss is nan at step 0" in lines[0] and "last good checkpoint: none" in lines[0]
    assert not (tmp_path / "o" / "draft").exists()


def test_training_benchmark_runs_both_recipes_with_in_epoch_evals(setup, tmp_path):
    """benchmark/bench_training.py end to end: two recipes in their own processes, evals inside the
    epoch (the schedule always ends with one at the last step), table, results.json and PNG."""
    root, _ = setup
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "benchmark" / "bench_training.py"),
                        "--model", str(root / "target"), "--data", str(root / "data"),
                        "--train-conversations", "5", "--eval-conversations", "2", "--max-length", "32",
                        "--epochs", "1", "--evals-per-epoch", "2", "--sim-steps", "2", "--precision", "fp32",
                        "--out", str(out)], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"ours", "baldeagle"}
    for res in results.values():
        assert res["train_conversations"] == 5 and res["eval_conversations"] == 2
        assert [round(e["epoch"], 1) for e in res["per_epoch"]] == [0.6, 1.0]  # 5 steps: evals at 3 and 5
        assert res["train_tokens_per_s"] > 0 and res["peak_memory_gb"] > 0
    assert (out / "bench_training.png").stat().st_size > 1000
    assert "top-1 ours" in r.stdout and "BaldEagle" in r.stdout
