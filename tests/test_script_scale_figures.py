"""benchmark/scale_figures.py (docs/gpu.md "Scaling out"): parameter counts equal the published ones, and
its bytes per token are what a shard written by modules/data/storage.py really takes on disk."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import scale_figures  # noqa: E402
from modules.data.storage import write_shard  # noqa: E402


@pytest.mark.parametrize("fused", [False, True])
def test_bytes_per_token_match_a_written_shard(tmp_path, fused):
    hidden, lengths = 96, [37, 5, 120]
    convs = []
    for r, n in enumerate(lengths):
        c = {"input_ids": torch.arange(n), "loss_mask": torch.ones(n, dtype=torch.long),
             "hidden_states": torch.randn(n, hidden), "row_id": r}
        if fused:
            c["aux_hidden_states"] = torch.randn(n, 3 * hidden)
        convs.append(c)
    stats = write_shard(tmp_path, 0, 3, convs, {})
    raw = (tmp_path / "shard-00000000-00000003.safetensors").read_bytes()
    data_bytes = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # minus the safetensors header
    per_token = scale_figures.bytes_per_token(hidden, fused)
    assert per_token == 5 + 2 * hidden * (4 if fused else 1)
    assert data_bytes == sum(lengths) * per_token + 16 * len(lengths) + 8  # + offsets[0]
    assert stats["bytes"] == len(raw)


def test_parameter_counts_and_figures(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert scale_figures.main(["--json", str(out)]) == 0
    rows = {r["target"]: r for r in json.loads(out.read_text())["targets"]}
    assert rows["Llama-3.1-8B"]["params"] == 8_030_261_248    # the published Llama-3.1-8B count
    assert rows["Llama-3.1-70B"]["params"] == 70_553_706_496  # ... and Llama-3.1-70B
    assert rows["Llama-3.1-8B"]["bytes_per_token_eagle3"] == 5 + 4 * 2 * 4096
    assert rows["Llama-3.1-70B"]["gpus_for_weights"] > 1  # 141 GB of bf16 weights: not on one 80 GB GPU
    assert rows["Llama-3.1-8B"]["online_memory_gb"] < 80 < rows["Llama-3.1-70B"]["online_memory_gb"]
    assert "Llama-3.1-70B: 70.55B params" in capsys.readouterr().out
