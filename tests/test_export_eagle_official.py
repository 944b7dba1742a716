"""Our exported EAGLE-1/2 draft loads STRICTLY in the official `eagle-llm` 1.2.1 EaModel, computes
the same draft function, and its lossless greedy `eagenerate` equals plain greedy generation."""
import pytest
import torch

pytest.importorskip("eagle", reason="interop test needs `pip install --no-deps eagle-llm==1.2.1`")

from modules.draft.eagle_draft import EagleDraft  # noqa: E402
from modules.draft.eagle_draft import export_draft  # noqa: E402
from tests._helpers_eagle import save_tiny_target  # noqa: E402


def _patch_eagle_llm_for_transformers5(monkeypatch):
    """eagle-llm 1.2.1 was written for transformers 4.x. Two fixes, for this test only:
    1. 5.x configs report rope_scaling {"rope_type": "default", ...} where 4.x had None: treat it as None.
    2. 5.x from_pretrained leaves the RoPE buffers (inv_freq, cos/sin caches) uninitialised: recompute them."""
    from eagle.model import cnets, ea_model, modeling_llama_kv

    for mod in (modeling_llama_kv, cnets):
        orig = mod.LlamaAttention._init_rope

        def _init_rope(self, mod=mod, orig=orig):
            rs = self.config.rope_scaling
            if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
                self.rotary_emb = mod.LlamaRotaryEmbedding(self.head_dim,
                                                           max_position_embeddings=self.max_position_embeddings)
            else:
                orig(self)

        monkeypatch.setattr(mod.LlamaAttention, "_init_rope", _init_rope)
    orig_from_pretrained = ea_model.EaModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = orig_from_pretrained(cls, *args, **kwargs)
        for m in model.modules():
            if hasattr(m, "_set_cos_sin_cache") and hasattr(m, "inv_freq"):
                dev = m.inv_freq.device
                m.inv_freq = 1.0 / (m.base ** (torch.arange(0, m.dim, 2, device=dev).float() / m.dim))
                m._set_cos_sin_cache(m.max_position_embeddings, dev, torch.get_default_dtype())
        return model

    monkeypatch.setattr(ea_model.EaModel, "from_pretrained", classmethod(from_pretrained))


def _save_tokenizer(folder, vocab_size):
    """EaModel loads the target's tokenizer (for eos): a word-level one over the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", unk_token="t0").save_pretrained(folder)


def test_official_eamodel_loads_export_strictly_and_decodes_losslessly(tmp_path, monkeypatch):
    _patch_eagle_llm_for_transformers5(monkeypatch)
    from eagle.model.ea_model import EaModel

    # eagle-llm's KV-Llama and draft ignore rope_theta (always 10000): use a target with that base
    target = save_tiny_target(tmp_path / "target", "llama",
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    _save_tokenizer(tmp_path / "target", target.config.vocab_size)
    torch.manual_seed(0)
    draft = EagleDraft.from_target(tmp_path / "target").eval()
    export_draft(draft, tmp_path / "draft", dtype=None)  # same tensors as trained: outputs compared exactly

    ea = EaModel.from_pretrained(base_model_path=str(tmp_path / "target"), ea_model_path=str(tmp_path / "draft"),
                                 dtype=torch.float32)  # load_state_dict(strict=True) inside
    ea.eval()
    # the same draft function: official ea_layer vs ours on the same features and tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (1, 10), generator=g)
    hs = torch.randn(1, 10, 64, generator=g)
    with torch.no_grad():
        theirs = ea.ea_layer(hs, input_ids=ids)
        ours = draft(ids, hs)
    assert torch.allclose(theirs, ours, atol=1e-5)

    prompt = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])
    with torch.no_grad():
        out = ea.eagenerate(prompt, temperature=0.0, max_new_tokens=24)
        ref = target.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    n = min(out.shape[1], ref.shape[1])
    assert n >= prompt.shape[1] + 20
    assert torch.equal(out[0, :n], ref[0, :n])
