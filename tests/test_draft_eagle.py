"""EagleDraft on tiny random Llama / Qwen2 / Mistral targets: frozen head from the target files,
cache / mask equivalences, save-load round trip in the serving layout."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers.cache_utils import DynamicCache

from modules.draft.loading import load_draft
from modules.draft.eagle_draft import EagleDraft
from modules.target_weights import load_embed_and_head
from tests._helpers_eagle import save_tiny_target

FAMILIES = ["llama", "qwen2", "mistral"]


def _inputs(draft, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, draft.config.vocab_size, (B, T), generator=g)
    hs = torch.randn(B, T, draft.config.hidden_size, generator=g)
    return ids, hs


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_builds_from_target_files_with_frozen_head(tmp_path, family):
    target = save_tiny_target(tmp_path / "t", family)
    draft = EagleDraft.from_target(tmp_path / "t")
    assert type(draft.layers[0]).__name__.lower().startswith(family)
    assert isinstance(draft.layers[0].input_layernorm, torch.nn.Identity)
    assert torch.equal(draft.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad
    assert draft.fc.bias is None and draft.fc.weight.shape == (64, 128)  # no fc bias by default (vLLM has none)
    ids, hs = _inputs(draft)
    out = draft(ids, hs)
    assert out.shape == hs.shape and torch.isfinite(out).all()
    assert draft.compute_logits(out).shape == (2, 12, 300)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_masks_and_attention_backends_agree(family):
    from tests._helpers_eagle import tiny_target
    draft = EagleDraft.from_target(tiny_target(family)).eval()
    ids, hs = _inputs(draft)
    with torch.no_grad():
        full = draft(ids, hs)
        # incremental decoding with a DynamicCache: 5 tokens, then 1 at a time
        out, cache = draft(ids[:, :5], hs[:, :5], use_cache=True)
        steps = [out]
        for t in range(5, 12):
            out, cache = draft(ids[:, t:t + 1], hs[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        # a ready 4D bool causal mask gives the same as None
        causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
        assert torch.allclose(draft(ids, hs, attention_mask=causal), full, atol=1e-5)
        # a 4D mask with a cache (tree decoding): 3 new tokens after 9 cached, each sees only itself
        cache = DynamicCache()
        draft(ids[:, :9], hs[:, :9], past_key_values=cache)
        tree = torch.zeros(2, 1, 3, 12, dtype=torch.bool)
        tree[..., :9] = True
        tree[..., 9:] = torch.eye(3, dtype=torch.bool)
        pos = torch.full((2, 3), 9)
        branch = draft(ids[:, 9:12], hs[:, 9:12], attention_mask=tree, position_ids=pos, past_key_values=cache)
        assert torch.allclose(branch[:, 0], full[:, 9], atol=1e-5)
        # 2D right padding: real positions unchanged
        pad = torch.ones(2, 12, dtype=torch.long)
        pad[1, 8:] = 0
        padded = draft(ids, hs, attention_mask=pad)
        assert torch.allclose(padded[1, :8], full[1, :8], atol=1e-5)
        # eager attention with the same weights and a bool 4D mask
        draft.config._attn_implementation = "eager"
        assert torch.allclose(draft(ids, hs), full, atol=1e-5)
        assert torch.allclose(draft(ids, hs, attention_mask=causal), full, atol=1e-5)
        draft.config._attn_implementation = "sdpa"


def test_save_load_round_trip_serving_layout(tmp_path):
    save_tiny_target(tmp_path / "t", "llama")
    draft = EagleDraft.from_target(tmp_path / "t", bias=True)
    draft.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle", "LlamaForCausalLM"]  # SGLang's name, then vLLM's
    assert cfg["num_hidden_layers"] == 1 and cfg["fc_bias"] is True and cfg["eagle_version"] == 2
    assert "bias" not in cfg  # SGLang reads "bias" as attention bias
    assert cfg["target_model"] == str(tmp_path / "t")
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {"fc.weight", "fc.bias", "embed_tokens.weight", "layers.0.post_attention_layernorm.weight"}
    expected |= {f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}
    expected |= {f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert keys == expected
    loaded = load_draft(tmp_path / "d")  # target found through config.target_model
    ids, hs = _inputs(draft)
    with torch.no_grad():
        assert torch.equal(loaded(ids, hs), draft(ids, hs))
    assert torch.equal(loaded.lm_head.weight, draft.lm_head.weight)
    # bf16 cast keeps RoPE frequencies in float32
    assert loaded.to(torch.bfloat16).rotary_emb.inv_freq.dtype == torch.float32


def test_tied_and_sharded_targets(tmp_path):
    target = save_tiny_target(tmp_path / "tied", "llama", tie_word_embeddings=True)
    embed, head = load_embed_and_head(tmp_path / "tied")
    assert head is embed and torch.equal(embed, target.model.embed_tokens.weight)
    draft = EagleDraft.from_target(tmp_path / "tied")
    assert draft.lm_head.weight is draft.embed_tokens.weight
    target = save_tiny_target(tmp_path / "sh", "qwen2", max_shard_size="40KB")
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    embed, head = load_embed_and_head(tmp_path / "sh")
    assert torch.equal(embed, target.model.embed_tokens.weight) and torch.equal(head, target.lm_head.weight)


def test_bias_flag_and_mismatched_weights(tmp_path):
    save_tiny_target(tmp_path / "t", "llama")
    draft = EagleDraft.from_target(tmp_path / "t", bias=False)
    assert draft.fc.bias is None
    with pytest.raises(ValueError, match="shape"):
        draft.load_frozen(torch.zeros(10, 64), torch.zeros(10, 64))


def test_embedded_gguf_embed_and_head_match_the_loaded_target(smollm2):
    """Reading just token_embd from the Q4_1 GGUF gives what transformers' full load gives."""
    model, _ = smollm2
    embed, head = load_embed_and_head(None)
    assert head is embed  # SmolLM2 ties them: no output.weight in the file
    assert torch.equal(embed, model.get_input_embeddings().weight)
    assert torch.equal(head, model.get_output_embeddings().weight)
