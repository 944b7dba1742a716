"""Export layouts (SGLang/vLLM safetensors + official pytorch_model.bin) and refusal of drafts
that do not fit the target; train/export.py CLI."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.draft.eagle_draft import EagleDraft
from modules.draft.eagle_draft import ExportError, export_draft
from tests._helpers_eagle import REPO_ROOT, save_tiny_target


def test_export_writes_both_layouts_with_the_same_tensors(tmp_path):
    save_tiny_target(tmp_path / "t", "llama")
    draft = EagleDraft.from_target(tmp_path / "t", bias=False)
    draft.save_pretrained(tmp_path / "ckpt")
    export_draft(tmp_path / "ckpt", tmp_path / "out", dtype=torch.bfloat16)
    st = load_file(str(tmp_path / "out" / "model.safetensors"))
    bin_sd = torch.load(str(tmp_path / "out" / "pytorch_model.bin"), weights_only=True)
    assert set(st) == set(bin_sd) and "embed_tokens.weight" in st
    # trained without a bias: a zero fc.bias for SGLang / eagle-llm (which build fc with one); vLLM drops it
    assert not st["fc.bias"].any()
    assert all(torch.equal(st[k], bin_sd[k]) and st[k].dtype == torch.bfloat16 for k in st)
    assert not any("input_layernorm" in k or k.startswith(("lm_head", "norm")) for k in st)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # SGLang takes the first name it has, vLLM prefixes "Eagle" to each and takes EagleLlamaForCausalLM
    assert cfg["architectures"] == ["LlamaForCausalLMEagle", "LlamaForCausalLM"]
    assert "bias" not in cfg  # SGLang would read it as attention bias
    assert cfg["rope_scaling"] is None and cfg["rope_theta"] == draft.config.rope_parameters["rope_theta"]
    assert cfg["num_hidden_layers"] == 1 and cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert not any(str(tmp_path) in json.dumps(v) for v in cfg.values())  # no machine paths


def test_export_of_a_family_no_engine_serves_is_refused(tmp_path):
    from modules.export.engines import EngineConventionError, eagle_architectures

    assert eagle_architectures("qwen2") == (["Qwen2ForCausalLMEagle"], ("sglang",))
    refused = "no serving engine has an EAGLE-1/2 draft class for model_type 'qwen3'"
    with pytest.raises(EngineConventionError, match=refused):
        eagle_architectures("qwen3")


def test_export_refuses_a_draft_for_another_target(tmp_path):
    save_tiny_target(tmp_path / "small", "llama")
    save_tiny_target(tmp_path / "wide", "llama", intermediate_size=96)
    EagleDraft.from_target(tmp_path / "small").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ExportError, match=r"mlp.gate_proj.weight has shape \(128, 64\), the target needs \(96, 64\)"):
        export_draft(tmp_path / "ckpt", tmp_path / "out", target=tmp_path / "wide")
    # a renamed key (would load as random weights in SGLang) is refused too
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    sd["midlayer.mlp.up_proj.weight"] = sd.pop("layers.0.mlp.up_proj.weight")
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    r = subprocess.run([sys.executable, "train/export.py", "--checkpoint", str(tmp_path / "ckpt"),
                        "--out", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing layers.0.mlp.up_proj.weight" in r.stderr and "unexpected midlayer.mlp.up_proj.weight" in r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_cli_dispatches_eagle3_checkpoints(tmp_path):
    """train/export.py on a train_eagle_ttt.py checkpoint writes the SGLang EAGLE-3 layout."""
    from tests._helpers_eagle3 import tiny_eagle3, tiny_target

    target = tiny_target()
    target.save_pretrained(tmp_path / "t")
    tiny_eagle3(target).save_pretrained(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "train/export.py", "--checkpoint", str(tmp_path / "ckpt"),
                        "--out", str(tmp_path / "out"), "--model", str(tmp_path / "t")],
                       cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert {"d2t", "t2d", "norm.weight", "midlayer.self_attn.q_proj.weight"} <= keys
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
