"""EAGLE-3 draft: structure, cache consistency, 4D masks, target-weight init, save/load."""
import json

import torch

from modules.draft import loading as draft_loading
from modules.draft.eagle3_draft import Eagle3Draft
from tests._helpers_eagle3 import AUX, VOCAB, tiny_eagle3, tiny_target


def test_structure_and_init_from_target():
    target = tiny_target()
    draft = tiny_eagle3(target)
    h = target.config.hidden_size
    assert draft.fc.weight.shape == (h, 3 * h) and draft.fc.bias is None
    assert draft.midlayer.self_attn.q_proj.weight.shape[1] == 2 * h
    assert draft.lm_head.weight.shape == (VOCAB // 3, h)
    assert not draft.embed_tokens.weight.requires_grad and draft.lm_head.weight.requires_grad
    assert torch.equal(draft.embed_tokens.weight, target.model.embed_tokens.weight)
    # lm_head rows are the target head's rows of the draft vocabulary
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight[draft.draft_ids])
    assert draft.to_target_ids(torch.tensor([0, 5])).tolist() == [0, 15]
    assert draft.aux_layers == AUX


def test_cached_and_masked_forward_match_full_forward():
    draft = tiny_eagle3().eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    fused = torch.randn(2, 12, 192)
    full = draft(ids, fused)
    a, cache = draft(ids[:, :7], fused[:, :7], use_cache=True)
    b, cache = draft(ids[:, 7:], fused[:, 7:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)
    # the draft's own output (width h) is accepted in place of fused features
    nxt = draft(ids[:, :1], b[:, -1:], past_key_values=cache)
    assert nxt.shape == (2, 1, 64)
    # a ready 4D bool mask equal to the causal one gives the same result
    mask = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
    torch.testing.assert_close(draft(ids, fused, attention_mask=mask), full)
    # a 2D padding mask leaves the real positions of a left-aligned row unchanged
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, 9:] = 0
    torch.testing.assert_close(draft(ids, fused, attention_mask=pad)[1, :9], full[1, :9], atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_in_sglang_layout(tmp_path):
    target = tiny_target()
    draft = tiny_eagle3(target)
    with torch.no_grad():
        draft.norm.weight.mul_(1.5)
    draft.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["draft_vocab_size"] == VOCAB // 3 and cfg["num_hidden_layers"] == 1
    # a checkpoint holds our ids (hidden_states index); exports write each engine's field (test_export_engines)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == AUX and "eagle_config" not in cfg
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "embed_tokens.weight",
            "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight"} <= keys
    assert not any(k.startswith("layers.") or "rotary" in k for k in keys)
    loaded = draft_loading.load_draft(tmp_path)
    assert isinstance(loaded, Eagle3Draft)
    ids = torch.randint(0, VOCAB, (1, 9))
    fused = torch.randn(1, 9, 192)
    torch.testing.assert_close(loaded.compute_logits(loaded(ids, fused)), draft.compute_logits(draft(ids, fused)))
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    # without the embedding in the file, it comes from the target module
    draft.save_pretrained(tmp_path / "noembed", with_embed=False)
    again = Eagle3Draft.from_pretrained(tmp_path / "noembed", target=target)
    assert torch.equal(again.embed_tokens.weight, target.model.embed_tokens.weight)


def test_eagle31_norms_compute_what_vllm_computes_and_round_trip(tmp_path):
    """--eagle31-norms: fc reads input_norm(fused) (vLLM's norm_before_fc), the state fed back is norm(out)
    (norm_output) and the logits stay lm_head(norm(out)), normed once. Saved and reloaded: the same outputs,
    config fields and an input_norm weight; control: the same file without input_norm.weight is refused."""
    target = tiny_target()
    torch.manual_seed(1)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 3), aux_layers=AUX,
                                    eagle31_norms=True).eval()
    plain = tiny_eagle3(target).eval()
    assert draft.input_norm is not None and plain.input_norm is None and draft.norm_output and not plain.norm_output
    with torch.no_grad():
        draft.input_norm.weight.uniform_(0.5, 1.5)
        draft.norm.weight.uniform_(0.5, 1.5)
    ids, fused = torch.randint(0, VOCAB, (1, 9)), torch.randn(1, 9, 192)
    g = draft.fc(draft.input_norm(fused))
    attn = draft.midlayer.self_attn
    pos = draft.rotary_emb(g, torch.arange(9)[None])
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    raw = draft.midlayer(draft.embed_tokens(ids), g, lambda x2: attn(x2, pos, causal))
    out = draft(ids, fused)
    torch.testing.assert_close(out, draft.norm(raw))
    torch.testing.assert_close(draft.compute_logits(out), draft.lm_head(draft.norm(raw)))
    draft.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["norm_before_fc"] is True and cfg["norm_output"] is True
    loaded = draft_loading.load_draft(tmp_path / "d")
    torch.testing.assert_close(loaded.compute_logits(loaded(ids, fused)), draft.compute_logits(out))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert sd["input_norm.weight"].shape == (192,)
    del sd["input_norm.weight"]
    save_file(sd, str(tmp_path / "d" / "model.safetensors"))
    try:
        draft_loading.load_draft(tmp_path / "d")
    except ValueError as err:
        assert "input_norm.weight" in str(err)
    else:
        raise AssertionError("a 3.1 draft without its input_norm loaded")
