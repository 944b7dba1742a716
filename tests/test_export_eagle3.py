"""EAGLE-3 export: a checkpoint folder re-exported (bf16) loads with the same logits; drafts that do
not fit the target are refused with one clear line."""
import json

import pytest
import torch

from modules.draft.eagle3_draft import Eagle3Draft
from modules.draft.eagle3_draft import Eagle3ExportError, export_eagle3
from tests._helpers_eagle3 import VOCAB, tiny_eagle3, tiny_target, tiny_target_config


def test_export_checkpoint_in_bf16(tmp_path):
    target = tiny_target()
    draft = tiny_eagle3(target)
    draft.save_pretrained(tmp_path / "ckpt")
    out = export_eagle3(tmp_path / "ckpt", tmp_path / "export", target=target, dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["dtype"] == "bfloat16"
    loaded = Eagle3Draft.from_pretrained(out)
    assert torch.equal(loaded.d2t, draft.d2t) and loaded.t2d.dtype == torch.bool
    ids, fused = torch.randint(0, VOCAB, (1, 7)), torch.randn(1, 7, 192)
    torch.testing.assert_close(loaded.compute_logits(loaded(ids, fused)), draft.compute_logits(draft(ids, fused)),
                               atol=0.05, rtol=0.05)


def test_refuses_a_draft_for_another_target(tmp_path):
    draft = tiny_eagle3()
    other = tiny_target_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(Eagle3ExportError, match="fc takes 192 features"):
        export_eagle3(draft, tmp_path / "x", target=other)
    with torch.no_grad():
        draft.t2d[1] = True  # marks a token d2t does not map to
    with pytest.raises(Eagle3ExportError, match="t2d"):
        export_eagle3(draft, tmp_path / "y", target=tiny_target_config())
    with pytest.raises(Eagle3ExportError, match="not a draft folder"):
        export_eagle3(tmp_path / "nothing", tmp_path / "z")


def test_export_keeps_the_eagle31_norms(tmp_path):
    """An EAGLE-3.1 draft (--eagle31-norms) exports input_norm.weight and norm_before_fc / norm_output, the names
    vLLM 0.32's Eagle3LlamaForCausalLM reads, and reloads with the same logits."""
    import json

    from safetensors import safe_open

    target = tiny_target()
    torch.manual_seed(1)
    # capture layers out of order: the export sorts them, permuting fc's input blocks and input_norm's weight alike
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 3), aux_layers=[3, 1, 2],
                                    eagle31_norms=True).eval()
    with torch.no_grad():
        draft.input_norm.weight.uniform_(0.5, 1.5)
    out = export_eagle3(draft, tmp_path / "export", target=target, dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_before_fc"] is True and cfg["norm_output"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "input_norm.weight" in f.keys()
    again = Eagle3Draft.from_pretrained(out, target=target).eval()
    assert again.aux_layers == [1, 2, 3]
    ids, layer = torch.randint(0, VOCAB, (1, 7)), {i: torch.randn(1, 7, 64) for i in (1, 2, 3)}

    def logits(d):
        return d.compute_logits(d(ids, torch.cat([layer[i] for i in d.aux_layers], dim=-1)))

    torch.testing.assert_close(logits(again), logits(draft))


def test_export_help_names_every_kind(capsys):
    """train/export.py --help describes what it exports: any registered kind, not only EAGLE-1/2 or EAGLE-3."""
    from train import export

    with pytest.raises(SystemExit):
        export.main(["--help"])
    first = capsys.readouterr().out.split("\n\n")[1]
    assert "any registered kind" in first and "EAGLE-1/2 or EAGLE-3" not in first
