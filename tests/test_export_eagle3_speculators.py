"""`speculators convert --algorithm eagle3` (vLLM's speculators 0.9.0) converts our EAGLE-3 export
with no missing or unexpected keys and validates it on CPU. speculators only WARNS on wrong keys
(exit code 0), so the test reads its log; a deliberately broken export shows that the check bites."""
import importlib.util
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests._helpers_eagle3 import tiny_eagle3, tiny_target

if importlib.util.find_spec("speculators") is None:
    pytest.skip("needs speculators 0.9.0 (see requirements-test.txt)", allow_module_level=True)


def convert(draft_dir, target_dir, out_dir):
    cmd = [sys.executable, "-m", "speculators", "convert", str(draft_dir), "--algorithm", "eagle3",
           "--verifier", str(target_dir), "--output-path", str(out_dir), "--validate-device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCHDYNAMO_DISABLE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return done.returncode, done.stdout + done.stderr


def test_speculators_convert_reports_no_key_problems(tmp_path):
    target = tiny_target()
    target.save_pretrained(tmp_path / "target")
    tiny_eagle3(target).save_pretrained(tmp_path / "draft")
    rc, log = convert(tmp_path / "draft", tmp_path / "target", tmp_path / "converted")
    assert rc == 0, log[-2000:]
    assert "Validation succeeded" in log, log[-2000:]
    assert "Missing keys" not in log and "Unexpected keys" not in log, log[-2000:]
    converted = load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert "layers.0.hidden_norm.weight" in converted and "d2t" in converted

    # negative control: a misnamed key is reported (only as a warning)
    sd = load_file(str(tmp_path / "draft" / "model.safetensors"))
    sd["midlayer.hidden_normx.weight"] = sd.pop("midlayer.hidden_norm.weight")
    save_file(sd, str(tmp_path / "draft" / "model.safetensors"))
    rc, log = convert(tmp_path / "draft", tmp_path / "target", tmp_path / "converted2")
    assert "Missing keys" in log and "hidden_norm" in log
