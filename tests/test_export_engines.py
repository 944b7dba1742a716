"""What our exports tell each engine (modules/export/engines.py), checked against the engines' own code where it
runs here: SpecForge's resolution and capture of EAGLE-3 layer ids, vLLM's reading order of the field,
the standard target folder. The real vLLM engine runs in tests/test_export_vllm_serving.py (`make test-vllm`)."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modules.export import engines
from modules.draft.eagle3_draft import Eagle3Draft
from modules.draft.eagle3_draft import Eagle3ExportError, export_eagle3
from modules.data.features import target_features
from tests._helpers_eagle3 import VOCAB, tiny_target


def specforge_fused_features(export_dir, target, ids):
    """The fused features SpecForge (and SGLang, which it drives) would feed this exported draft:
    SpecForge's own resolution of the capture ids, then its capture code (hidden_states[id + 1])."""
    from types import SimpleNamespace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from specforge.algorithms.model_providers import resolve_eagle_capture_layers
        from specforge.modeling.draft.dflash import extract_context_feature
    cfg = json.loads((export_dir / "config.json").read_text())
    run = SimpleNamespace(model=SimpleNamespace(aux_hidden_state_layer_ids=None))
    layer_ids = resolve_eagle_capture_layers(run, cfg, target.config)
    with torch.no_grad():
        hs = target.model(input_ids=ids, output_hidden_states=True).hidden_states
    return extract_context_feature(list(hs), layer_ids)


@pytest.mark.parametrize("layers,aux", [(8, None), (8, [1, 3, 6]), (4, [1, 2, 3])],
                         ids=["default-ids", "custom-ids", "custom-ids-4-layers"])
def test_specforge_captures_the_features_our_data_stores(tmp_path, layers, aux):
    target = tiny_target(num_hidden_layers=layers)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 3), aux_layers=aux)
    export_eagle3(draft, tmp_path, target=target)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if aux is None:  # default ids: no field at all (every engine's default selects the same tensors)
        assert engines.AUX_KEY not in cfg and "eagle_config" not in cfg
    else:  # vLLM's field in our convention, SGLang/SpecForge's in theirs (output of layer i = our i - 1)
        assert cfg[engines.AUX_KEY] == aux and cfg["eagle_config"][engines.AUX_KEY] == [i - 1 for i in aux]
    ids = torch.randint(0, VOCAB, (1, 11))
    _, stored = target_features(target, ids, aux_layers=draft.aux_layers)  # what generate_data_fused_features writes
    torch.testing.assert_close(specforge_fused_features(tmp_path, target, ids), stored, rtol=0, atol=0)
    # and our loader reads the export back to the same ids
    assert Eagle3Draft.from_pretrained(tmp_path, target=target).aux_layers == draft.aux_layers


def test_vllm_reads_the_top_level_field_before_the_nested_one():
    # vLLM 0.32 gpu_model_runner._get_eagle3_aux_layers_from_config: top level first, then eagle_config
    fields = engines.aux_layer_fields([1, 3, 6], 8)
    assert engines.read_aux_layers(fields, 8) == [1, 3, 6]  # read as vLLM does: the top-level list
    assert engines.read_aux_layers({"eagle_config": fields["eagle_config"]}, 8) == [1, 3, 6]  # SpecForge-made
    assert engines.read_aux_layers({}, 8) == engines.default_aux_layers(8)


def test_unsorted_ids_are_exported_sorted_with_fc_permuted(tmp_path):
    """Engines hand the captured layers over in layer order: fc's input blocks must follow."""
    target = tiny_target(num_hidden_layers=8)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 3), aux_layers=[6, 1, 3])
    export_eagle3(draft, tmp_path, target=target, dtype=None)
    exported = Eagle3Draft.from_pretrained(tmp_path, target=target)
    assert exported.aux_layers == [1, 3, 6]
    ids = torch.randint(0, VOCAB, (1, 9))
    _, fused_trained = target_features(target, ids, aux_layers=[6, 1, 3])
    _, fused_served = target_features(target, ids, aux_layers=[1, 3, 6])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids, fused_served), draft(ids, fused_trained))


@pytest.mark.parametrize("aux,msg", [([0, 2, 3], r"ids \[0\] outside 1..7"), ([2, 2, 5], "3 distinct"),
                                     ([1, 4, 8], r"ids \[8\] outside 1..7")])
def test_ids_no_engine_can_capture_are_refused(tmp_path, aux, msg):
    target = tiny_target(num_hidden_layers=8)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 3), aux_layers=aux)
    with pytest.raises(Eagle3ExportError, match=msg):
        export_eagle3(draft, tmp_path, target=target)


def test_eagle3_export_has_rope_and_dtype_fields_old_loaders_read(tmp_path):
    llama31_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    target = tiny_target(num_hidden_layers=8, rope_parameters=llama31_rope)
    export_eagle3(Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 3)), tmp_path, target=target)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0  # SGLang's decoder layer reads this (default 10000)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    assert cfg["rope_parameters"] == llama31_rope
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"  # bf16 by default
    assert load_file(str(tmp_path / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16
    assert not any(str(tmp_path) in json.dumps(v) for v in cfg.values())


def test_target_folder_is_a_standard_checkpoint(tmp_path, smollm2):
    """vLLM resolves a bare LlamaModel without `architectures`, and needs the tied embedding under its
    canonical name: the converted embedded target (what convert_target.py writes) has both."""
    from modules.target import embedded_converted

    folder = embedded_converted()  # built by the smollm2 fixture's load
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert "_name_or_path" not in cfg and cfg["torch_dtype"] == "float32"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys
    assert torch.equal(embed, smollm2[0].get_input_embeddings().weight)
