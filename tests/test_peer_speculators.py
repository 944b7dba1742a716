"""benchmark/peers: the CPU patches of speculators 0.9.0 (exact matches, refusals), the data conversion to its format
(the pre-norm last state from our post-norm one, checked against a real forward, with a control that the wrong
convention fails) and our loader of its EAGLE-3 checkpoints (the converted draft gives the peer's own logits)."""
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from benchmark.peers import patch_speculators as ps
from benchmark.peers import speculators_format as sf
from tests._helpers_eagle3 import AUX, VOCAB, tiny_target, tiny_target_config

HAS_SPECULATORS = importlib.util.find_spec("speculators") is not None


# ---- the patch script ---------------------------------------------------------------------------

def fixture_package(tmp_path):
    """A fake speculators package holding every patched snippet once, between other lines."""
    pkg = tmp_path / "site" / "speculators"
    texts = {}
    for p in ps.PATCHES:
        texts[p.file] = texts.get(p.file, "# head\n") + p.old + "        pass  # other code\n"
    for file, text in texts.items():
        (pkg / file).parent.mkdir(parents=True, exist_ok=True)
        (pkg / file).write_text(text)
    return pkg


def test_patches_apply_once_and_rerun_is_a_no_op(tmp_path):
    pkg = fixture_package(tmp_path)
    todo, applied = ps.apply(pkg)
    assert len(todo) == len(ps.PATCHES) and not applied
    for p in ps.PATCHES:
        text = (pkg / p.file).read_text()
        assert p.new in text and p.old not in text
    code = [line.split("#")[0] for line in (pkg / "train/trainer.py").read_text().splitlines()]
    assert not any("self.local_rank" in line for line in code)
    before = {f: (pkg / f).read_text() for f in {p.file for p in ps.PATCHES}}
    todo, applied = ps.apply(pkg)
    assert not todo and len(applied) == len(ps.PATCHES)
    assert before == {f: (pkg / f).read_text() for f in before}


def test_patches_touch_only_device_plumbing():
    """Every changed line names a device, the accelerator guard or the autocast device type: no math."""
    for p in ps.PATCHES:
        changed = set(p.new.splitlines()) - set(p.old.splitlines())
        for line in changed:
            assert any(w in line for w in ('"cpu"', "torch.accelerator")), line


@pytest.mark.parametrize("change", ["missing", "twice"])
def test_patch_refuses_a_changed_file_and_writes_nothing(tmp_path, change, capsys):
    pkg = fixture_package(tmp_path)
    f = pkg / "train/trainer.py"
    text = f.read_text()
    p = ps.PATCHES[1]
    f.write_text(text.replace(p.old, "") if change == "missing" else text + p.old)
    snapshot = {q.file: (pkg / q.file).read_text() for q in ps.PATCHES}
    rc = ps.main(["--site-packages", str(pkg.parent)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert ("0 times" if change == "missing" else "2 times") in err
    assert snapshot == {q.file: (pkg / q.file).read_text() for q in ps.PATCHES}  # all or nothing


@pytest.mark.skipif(not HAS_SPECULATORS, reason="needs speculators 0.9.0 (requirements-test.txt)")
def test_patches_match_the_released_speculators_exactly_once():
    """Against the installed (unpatched) speculators 0.9.0 source: every snippet found, nothing written."""
    pkg = ps.package_dir("auto")
    if "CPU patch" in (pkg / "train/trainer.py").read_text():
        pytest.skip("this speculators is already patched")
    todo, applied = ps.apply(pkg, check=True)
    assert len(todo) == len(ps.PATCHES) and not applied


# ---- data conversion ------------------------------------------------------------------------------

def test_pre_norm_trick_matches_a_real_forward_and_the_wrong_convention_fails():
    target = tiny_target(seed=3)
    with torch.no_grad():  # a final norm weight far from 1, so the conventions differ clearly
        target.model.norm.weight.copy_(torch.linspace(0.3, 3.0, target.config.hidden_size))
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    check = sf.check_pre_norm(target, ids)
    assert check["post_vs_norm_of_true_pre_max_abs"] < 1e-5  # the hook saw the true pre-norm state
    # within what the norm's eps predicts (the only difference), and the same top tokens
    assert check["trick_normed_rel"] <= 1.05 * check["eps_bound_rel"] + 1e-6 and check["trick_top1_agree"] == 1.0
    assert check["wrong_normed_rel"] > 0.1  # the control: post-norm given as pre-norm is far off
    assert check["bf16_trick_normed_rel"] < 1e-2


def test_peer_sample_layout():
    T, H = 7, 8
    post, aux = torch.randn(T, H), torch.randn(T, 3 * H)
    w = torch.rand(H) + 0.5
    item = {"input_ids": torch.arange(T), "loss_mask": torch.tensor([0, 0, 1, 1, 1, 0, 1]),
            "hidden_states": post.to(torch.bfloat16), "aux_hidden_states": aux.to(torch.bfloat16)}
    s = sf.peer_sample(item, w, max_length=6)
    assert s["hidden_states"].shape == (6, 4, H) and s["hidden_states"].dtype == torch.bfloat16
    assert torch.equal(s["token_ids"], torch.arange(6)) and s["token_ids"].dtype == torch.int64
    assert s["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0]
    # aux blocks in fc order, then the pre-norm state whose norm is our post-norm state
    for j in range(3):
        assert torch.allclose(s["hidden_states"][:, j].float(), aux[:6, j * H:(j + 1) * H], atol=2e-2)
    pre = s["hidden_states"][:, 3].float()
    expected = post[:6].to(torch.bfloat16).float() / w  # post / norm weight, elementwise
    assert ((pre - expected).norm() / expected.norm()) < 1e-2
    with pytest.raises(sf.PeerFormatError):
        sf.pre_norm_state(post, torch.zeros(H))


def test_vocab_files(tmp_path):
    import numpy as np

    ids = torch.tensor([0, 3, 4, 10, 299])
    d2t_path, t2d_path = sf.write_vocab(ids, VOCAB, tmp_path)
    assert d2t_path.name == "d2t-5.npy" and t2d_path.name == "t2d-5.npy"
    d2t, t2d = np.load(d2t_path), np.load(t2d_path)
    assert d2t.dtype == np.int64 and t2d.dtype == bool and t2d.shape == (VOCAB,)
    assert (np.arange(5) + d2t).tolist() == ids.tolist() and np.flatnonzero(t2d).tolist() == ids.tolist()
    with pytest.raises(sf.PeerFormatError):
        sf.write_vocab(torch.tensor([4, 3]), VOCAB, tmp_path)


# ---- our loader of speculators' EAGLE-3 checkpoints -------------------------------------------------

def peer_checkpoint(tmp_path, draft_ids, norm_before_residual=True, eagle31=True):
    """A tiny speculators Eagle3DraftModel with random weights everywhere (norms included), saved."""
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    tl = tiny_target_config(num_hidden_layers=1)
    tl._attn_implementation = "sdpa"
    cfg = Eagle3SpeculatorConfig(
        transformer_layer_config=tl, draft_vocab_size=len(draft_ids), norm_before_residual=norm_before_residual,
        norm_before_fc=eagle31, norm_output=eagle31, eagle_aux_hidden_state_layer_ids=AUX,
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=None, architectures=["LlamaForCausalLM"])))
    torch.manual_seed(5)
    model = Eagle3DraftModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[draft_ids] = True
    model.load_vocab_mappings(t2d, draft_ids - torch.arange(len(draft_ids)))
    model.save_pretrained(tmp_path / "peer")
    return model


def peer_logits(model, hidden, ids, steps):
    """The peer's own logits of each TTT step (a hook on its lm_head)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(hidden_states=hidden, input_ids=ids, document_ids=torch.zeros_like(ids),
                  position_ids=torch.arange(ids.shape[1]).unsqueeze(0), ttt_steps=steps)
    finally:
        handle.remove()
    return seen


@pytest.mark.skipif(not HAS_SPECULATORS, reason="needs speculators 0.9.0 (requirements-test.txt)")
@pytest.mark.parametrize("variant", ["defaults", "plain"])
def test_loaded_peer_checkpoint_gives_the_peers_logits(tmp_path, variant):
    from modules.draft.eagle3_draft import Eagle3Draft
    from modules.training.ttt_trainer import TTTUnroll

    draft_ids = torch.arange(0, VOCAB, 3)
    eagle = variant == "defaults"  # speculators' defaults: norm_before_residual + EAGLE-3.1 norms
    model = peer_checkpoint(tmp_path, draft_ids, norm_before_residual=eagle, eagle31=eagle)
    saved = load_file(str(tmp_path / "peer" / "model.safetensors"))
    assert any(k.startswith("layers.0.") for k in saved) and "embed_tokens.weight" in saved

    ours = sf.load_speculators_eagle3(tmp_path / "peer", target=tiny_target(num_hidden_layers=4))
    assert ours.midlayer.norm_before_residual is eagle and (ours.input_norm is not None) is eagle
    assert ours.norm_output is eagle
    assert torch.equal(ours.draft_ids, draft_ids)

    g = torch.Generator().manual_seed(1)
    T, H = 12, 64
    hidden = torch.randn(1, T, 3 * H, generator=g)
    ids = torch.randint(3, VOCAB, (1, T), generator=g)
    steps = 3
    expected = peer_logits(model, hidden, ids, steps)
    with torch.no_grad():
        # decoding path: one forward over the sequence (step 0)
        step0 = ours.compute_logits(ours(ids, hidden))
        assert torch.allclose(step0, expected[0], atol=1e-4), (step0 - expected[0]).abs().max()
        # training-time test: every step of the unroll
        k, b, t = torch.meshgrid(torch.arange(steps), torch.zeros(1, dtype=torch.long), torch.arange(T),
                                 indexing="ij")
        _, logits = TTTUnroll(ours)(ids, hidden, torch.ones(1, T, dtype=torch.long), steps,
                                    (k.flatten(), b.flatten(), t.flatten()))
    logits = logits.view(steps, T, -1)
    for s in range(steps):
        assert torch.allclose(logits[s], expected[s][0], atol=1e-4), (s, (logits[s] - expected[s][0]).abs().max())

    # control: the same weights read without norm_before_residual give other logits (the flag is what matters)
    if eagle:
        cfg = json.loads((tmp_path / "peer" / "config.json").read_text())
        cfg["norm_before_residual"] = False
        (tmp_path / "peer" / "config.json").write_text(json.dumps(cfg))
        wrong = sf.load_speculators_eagle3(tmp_path / "peer", target=tiny_target(num_hidden_layers=4))
        with torch.no_grad():
            assert not torch.allclose(wrong.compute_logits(wrong(ids, hidden)), expected[0], atol=1e-2)

    # round trip through our own layout (what our decoder's loader reads)
    ours.save_pretrained(tmp_path / "ours")
    again = Eagle3Draft.from_pretrained(tmp_path / "ours", target=tiny_target(num_hidden_layers=4))
    with torch.no_grad():
        assert torch.allclose(again.compute_logits(again(ids, hidden)), expected[0], atol=1e-4)


def test_loader_refuses_what_our_draft_cannot_express(tmp_path):
    base = {"speculators_model_type": "eagle3", "draft_vocab_size": 10, "eagle_aux_hidden_state_layer_ids": AUX,
            "transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64}}
    with pytest.raises(sf.PeerFormatError, match="not an EAGLE-3"):
        sf.our_config({**base, "speculators_model_type": "dflash"})
    with pytest.raises(sf.PeerFormatError, match="draft layers"):
        sf.our_config({**base, "transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 2}})
    with pytest.raises(sf.PeerFormatError, match="fc_norm"):
        sf.our_config({**base, "fc_norm": True})
    with pytest.raises(sf.PeerFormatError, match="unknown weight"):
        sf.our_state_dict({"mystery.weight": torch.zeros(1)})
    assert set(sf.our_state_dict({"layers.0.mlp.up_proj.weight": 1, "verifier_lm_head.weight": 2, "d2t": 3})) == {
        "midlayer.mlp.up_proj.weight", "d2t"}
