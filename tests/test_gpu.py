"""CUDA checks (marker `gpu`, `make test-gpu`): the pipeline on a tiny target built from a config and a
small committed conversation file, on the GPU. Skipped without CUDA, so `make test` reports them as
skipped. Nothing here imports `datasets` or `gguf` (the lent GPU machine has neither).

The bodies run on any device: EAGLE_TEST_DEVICE=cpu runs them on CPU, which is how their logic was
checked on a machine without a GPU (`EAGLE_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`).

Tolerances (stated, tiny random Llama targets, hidden 64):
- features stored in bf16 by a target run in bf16 vs the fp32 reference: relative L2 error per
  conversation <= BF16_REL (bf16 has 8 mantissa bits: ~4e-3 per rounding, a few roundings a layer);
- fp32 features batched by tokens vs one conversation per forward: max abs error <= FP32_ATOL
  (right padding + causal attention: the same function, other kernels).
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("EAGLE_TEST_DEVICE", "cuda")
REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "tests" / "data" / "gpu_conversations.jsonl"  # 24 ShareGPT-style rows, a few KB
BF16_REL = 0.05
FP32_ATOL = 1e-4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="needs CUDA (make test-gpu on a GPU machine)")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests._helpers_data import tiny_target_dir

    # 8 layers: distinct EAGLE-3 capture layers [2, 4, 5]
    return tiny_target_dir(tmp_path_factory.mktemp("gpu") / "model", layers=8, tie=False)


def _generate(script, model, outdir, *extra):
    module = __import__(script)
    rc = module.main(["--model", model, "--dataset", str(ROWS), "--outdir", str(outdir), "--max-length", "384",
                      "--device", DEVICE, "--no-progress", *extra])
    assert rc == 0
    from modules.data.storage import EagleDataset
    return EagleDataset([str(outdir)], read_aux=script == "generate_data_fused_features")


@pytest.fixture(scope="module")
def data(model_dir, tmp_path_factory):
    """{script: {variant: dataset}}: fp32 batched by tokens, fp32 one conversation a forward, bf16 stored."""
    base = tmp_path_factory.mktemp("gpu_data")
    out = {}
    for script in ("generate_data", "generate_data_fused_features"):
        out[script] = {
            "fp32": _generate(script, model_dir, base / script / "fp32", "--dtype", "fp32", "--store-dtype", "fp32",
                              "--batch-tokens", "2048"),
            "fp32_one": _generate(script, model_dir, base / script / "one", "--dtype", "fp32", "--store-dtype",
                                  "fp32", "--batch-tokens", "1"),
            "bf16": _generate(script, model_dir, base / script / "bf16", "--dtype", "bf16", "--store-dtype", "bf16",
                              "--batch-tokens", "2048"),
        }
    return out


@pytest.mark.parametrize("script", ["generate_data", "generate_data_fused_features"])
def test_generators_batch_by_tokens_and_bf16_features_match_fp32(data, script):
    runs = data[script]
    assert len(runs["fp32"]) == len(runs["bf16"]) == len(runs["fp32_one"]) >= 20
    keys = ["hidden_states"] + (["aux_hidden_states"] if script.endswith("fused_features") else [])
    worst = 0.0
    for i in range(len(runs["fp32"])):
        ref, one, bf = runs["fp32"][i], runs["fp32_one"][i], runs["bf16"][i]
        assert torch.equal(ref["input_ids"], bf["input_ids"]) and torch.equal(ref["loss_mask"], one["loss_mask"])
        for key in keys:
            assert bf[key].dtype == torch.bfloat16 and ref[key].dtype == torch.float32
            assert (ref[key] - one[key]).abs().max().item() <= FP32_ATOL, (i, key)
            rel = ((bf[key].float() - ref[key]).norm() / ref[key].norm()).item()
            worst = max(worst, rel)
    print(f"{script}: bf16 vs fp32 features, worst relative L2 error {worst:.4f} (tolerance {BF16_REL})")
    assert worst <= BF16_REL


def _train(script, argv):
    from train import train, train_eagle_ttt

    return (train_eagle_ttt if script == "ttt" else train).main(argv)


@pytest.mark.parametrize("script", ["train", "ttt"])
def test_trainers_on_device_sdpa_loss_decreases_and_resume(data, model_dir, tmp_path, script):
    """A few bf16 steps with sdpa attention, the logged loss going down, then a resume from the checkpoint."""
    folder = data["generate_data_fused_features" if script == "ttt" else "generate_data"]["bf16"].folders[0]
    out = tmp_path / "run"
    common = ["--model", model_dir, "--data", str(folder), "--output-dir", str(out), "--attn", "sdpa",
              "--precision", "bf16", "--lr", "3e-3", "--warmup", "0", "--grad-accum", "1", "--batch-size", "4",
              "--logging-steps", "1", "--save-steps", "6", "--eval-fraction", "0.1", "--max-length", "384"]
    if script == "ttt":
        common += ["--ttt-steps", "3"]
    assert _train(script, common + ["--max-steps", "12"]) == 0
    losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    print(f"{script}: losses {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert (out / "checkpoint-6" / "model.safetensors").is_file()
    # resume: from the last checkpoint (step 12) to step 16
    assert _train(script, common + ["--max-steps", "16", "--resume", "auto"]) == 0
    steps = [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert steps == list(range(1, 17)), steps  # 1-12 kept from the checkpoint, 13-16 new
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["draft"]


def test_online_eagle3_on_device(model_dir, tmp_path):
    out = tmp_path / "online"
    rc = _train("ttt", ["--model", model_dir, "--online", "--dataset", str(ROWS), "--end", "16",
                        "--output-dir", str(out), "--max-steps", "4", "--ttt-steps", "2", "--grad-accum", "1",
                        "--batch-size", "2", "--eval-fraction", "0.25", "--max-length", "384",
                        "--target-dtype", "bf16", "--attn", "sdpa", "--logging-steps", "2"])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["online"] is True


def test_export_and_reload_on_device(data, model_dir, tmp_path):
    from modules.draft.loading import load_draft
    from train import export

    folder = data["generate_data_fused_features"]["fp32"].folders[0]
    out = tmp_path / "run"
    assert _train("ttt", ["--model", model_dir, "--data", str(folder), "--output-dir", str(out), "--max-steps", "2",
                          "--ttt-steps", "2", "--grad-accum", "1", "--eval-fraction", "0", "--save-steps", "2",
                          "--max-length", "384"]) == 0
    assert export.main(["--checkpoint", str(out / "draft"), "--out", str(tmp_path / "export"),
                        "--model", model_dir]) == 0
    trained = load_draft(out / "draft", target_model=model_dir)
    exported = load_draft(tmp_path / "export", target_model=model_dir).to(DEVICE)
    for name, p in trained.state_dict().items():  # the export is bf16: equal to the trained draft in bf16
        q = exported.state_dict()[name]
        assert q.device.type == torch.device(DEVICE).type
        assert torch.equal(q.cpu().to(torch.bfloat16), p.to(torch.bfloat16)), name


def _decode_pair(kind, dtype):
    """A tiny random target and a random draft of `kind` on the device."""
    from tests import _helpers_eagle, _helpers_eagle3
    from modules.draft.eagle_draft import EagleDraft

    if kind == "eagle3":
        target = _helpers_eagle3.tiny_target()
        draft = _helpers_eagle3.tiny_eagle3(target)
    else:
        target = _helpers_eagle.tiny_target("llama")
        torch.manual_seed(1)
        draft = EagleDraft.from_target(target)
    return target.to(DEVICE, dtype).eval(), draft.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_tree_and_hybrid_decoding_lossless_fp32_bf16_reported(kind):
    from modules.decode.tree_decoding import EagleDecoder
    from tests._helpers_decode import plain_greedy

    for dtype in (torch.float32, torch.bfloat16):
        target, draft = _decode_pair(kind, dtype)
        matched = 0
        prompts = [torch.randint(3, 300, (17,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
        for prompt in prompts:
            ref = plain_greedy(target, prompt.to(DEVICE), 40)
            shape = dict(total_tokens=12, depth=4, top_k=3)
            tree = EagleDecoder(target, draft, **shape).generate(prompt, 40)
            hybrid = EagleDecoder(target, draft, **shape, lookup_tokens=8).generate(prompt, 40)
            if dtype == torch.float32:
                assert tree.tokens == ref and hybrid.tokens == ref, (kind, prompt.tolist())
            matched += (tree.tokens == ref) + (hybrid.tokens == ref)
        print(f"{kind} {dtype}: {matched}/{2 * len(prompts)} outputs equal plain greedy")


def test_decoding_host_syncs_per_cycle():
    """The decoder reads the host once a cycle (the accepted tokens); a few more reads are allowed a
    cycle (the tree's shape), none that grow with the tree. On CUDA, torch's sync debug mode counts them."""
    from modules.decode.tree_decoding import EagleDecoder

    target, draft = _decode_pair("eagle3", torch.float32)
    prompt = torch.randint(3, 300, (17,), generator=torch.Generator().manual_seed(0))
    EagleDecoder(target, draft, total_tokens=12, depth=4, top_k=3).generate(prompt, 8)  # warm-up
    counts = {}
    for depth in (2, 6):
        dec = EagleDecoder(target, draft, total_tokens=24, depth=depth, top_k=3)
        if DEVICE.startswith("cuda"):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    res = dec.generate(prompt, 40)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            n = sum("synchronizing" in str(w.message) for w in seen)
        else:
            from tests.test_training_host_syncs import CountSyncs
            with CountSyncs() as c:
                res = dec.generate(prompt, 40)
            n = c.count
        counts[depth] = n / len(res.accept_lengths)
    print(f"host syncs per cycle: depth 2 {counts[2]:.1f}, depth 6 {counts[6]:.1f}")
    assert counts[6] <= counts[2] + 1.0, counts  # deeper trees do not add a sync per level
    assert counts[6] <= SYNCS_PER_CYCLE + 0.5, counts  # + 0.5: the prefill's read, spread over the cycles


# Measured on CPU with tests/test_training_host_syncs.CountSyncs (the ops that block the host on a GPU):
# 3 a cycle at depth 2 and 6 (the accepted path's nonzero + its size, the tokens' tolist). Before the
# ancestor matrix was built by squaring: 7 at depth 2, 9 at depth 6 (one nonzero per tree level).
SYNCS_PER_CYCLE = 3


def test_packed_linear_stays_out_of_the_way(model_dir):
    """modules/cpu_linear.py packs CPU fp32 layers only: a GPU target keeps nn.Linear, a loaded draft
    moved to the GPU runs F.linear (its packed copy is never built)."""
    from modules.cpu_linear import PackedLinear
    from modules.target import load_target_model
    from tests._helpers_eagle3 import tiny_eagle3

    if not DEVICE.startswith("cuda"):
        pytest.skip("what is checked is the CUDA path")
    target = load_target_model(model_dir, dtype="fp32", device=DEVICE)
    assert not any(isinstance(m, PackedLinear) for m in target.modules())
    layer = PackedLinear.from_linear(torch.nn.Linear(64, 32)).to(DEVICE)
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert layer._packed is None
    draft = tiny_eagle3()
    from modules.cpu_linear import pack_linears
    pack_linears(draft)
    draft.to(DEVICE)
    assert all(m._packed is None for m in draft.modules() if isinstance(m, PackedLinear))


def test_allocation_on_one_gpu(model_dir, tmp_path):
    out = tmp_path / "alloc"
    devices = ["--gpus", "0"] if DEVICE.startswith("cuda") else ["--workers", "1"]
    cmd = [sys.executable, "allocation.py", "--outdir", str(out), "--dataset", str(ROWS), "--end", "12", *devices,
           "--", "--model", model_dir, "--max-length", "384", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = sorted(out.glob("part-*"))
    assert len(parts) == 1
    manifest = json.loads((parts[0] / "manifest.json").read_text())
    assert manifest["rows_written"] >= 10 and manifest["start_row"] == 0 and manifest["end_row"] == 12
