"""Our EAGLE-3 data and drafts <-> vLLM `speculators` 0.9.0's formats (benchmark/bench_vs_speculators.py).

Data. speculators trains from a `datasets` folder (input_ids, loss_mask, seq_len per conversation) and one
`hs_{i}.safetensors` per conversation i: `hidden_states` [T, n_aux + 1, H] (the aux layers, then the target's last
hidden state BEFORE its final norm: speculators applies the target's norm itself) and `token_ids` [T]. Our data
stores the last state AFTER the final norm (what lm_head reads). RMSNorm is scale-invariant, so post / weight (the
target's final-norm weight, elementwise) is a valid pre-norm state: norm(post / w) = w * (post / w) / rms(post / w)
= post, up to the norm's eps (rms(post / w) = rms(x) / sqrt(ms(x) + eps) for the true pre-norm x, i.e. 1 - eps/(2
ms(x))). check_pre_norm() measures that on a real forward. This module writes the hidden-state files (our
virtualenv); the datasets folder is written by speculators_dataset.py in speculators' own virtualenv (its
`datasets` version reads it back).

Drafts. load_speculators_eagle3() reads a speculators EAGLE-3 checkpoint (config.json with
speculators_model_type "eagle3" and a nested transformer_layer_config; weights layers.0.* for our midlayer.*) as our
Eagle3Draft, with its norms: norm_before_residual (the attention's residual is the normed hidden stream),
norm_before_fc (our input_norm) and norm_output. What our draft cannot express (more than one decoder layer,
per-layer fc norms, a Qwen3 layer) is refused with a clear error.
"""
import json
from pathlib import Path

import torch

PEER_WEIGHTS = "model.safetensors"

PEER_EAGLE3_TYPE = "eagle3"  # speculators' own `speculators_model_type` of an EAGLE-3 checkpoint (its format)


class PeerFormatError(ValueError):
    pass


# ---- data --------------------------------------------------------------------------------------

def pre_norm_state(post: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """A pre-final-norm state whose RMSNorm (with `norm_weight`) is `post`, up to the norm's eps: post / weight."""
    w = norm_weight.float()
    if bool((w.abs() < 1e-6).any()):
        raise PeerFormatError("the target's final norm has a zero weight: post-norm states cannot be un-normed")
    return post.float() / w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama RMSNorm (as speculators' verifier_norm computes it), in fp32."""
    x = x.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def peer_sample(item: dict, norm_weight: torch.Tensor, max_length: int, dtype=torch.bfloat16) -> dict:
    """One conversation of our data (EagleDataset item with aux_hidden_states) as speculators' hs file tensors:
    hidden_states [T, n_aux + 1, H] (aux blocks in fc order, then the pre-norm last state), token_ids [T]; plus
    loss_mask [T] (read by speculators_dataset.py, ignored by speculators' loader)."""
    ids, mask = item["input_ids"][:max_length], item["loss_mask"][:max_length]
    aux, last = item["aux_hidden_states"][:max_length], item["hidden_states"][:max_length]
    T, H = last.shape
    if aux.shape[0] != T or aux.shape[1] % H:
        raise PeerFormatError(f"aux hidden states {tuple(aux.shape)} do not fit the last state {tuple(last.shape)}")
    blocks = aux.reshape(T, aux.shape[1] // H, H).float()
    pre = pre_norm_state(last, norm_weight).unsqueeze(1)
    return {"hidden_states": torch.cat([blocks, pre], dim=1).to(dtype).contiguous(),
            "token_ids": ids.long().contiguous(), "loss_mask": mask.long().contiguous()}


def write_peer_hidden_states(ds, rows, norm_weight, max_length: int, out_dir) -> list[int]:
    """hs_{i}.safetensors for conversation rows[i] of `ds` (our EagleDataset, read_aux=True), i = 0.. in order.
    Returns the sequence lengths. An existing complete folder (same rows) is kept."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "rows.json"
    if index.is_file() and json.loads(index.read_text()).get("rows") == list(map(int, rows)):
        return json.loads(index.read_text())["lengths"]
    lengths = []
    for i, r in enumerate(rows):
        sample = peer_sample(ds[int(r)], norm_weight, max_length)
        save_file(sample, str(out / f"hs_{i}.safetensors"))
        lengths.append(int(sample["token_ids"].numel()))
    index.write_text(json.dumps({"rows": list(map(int, rows)), "lengths": lengths}))
    return lengths


def write_vocab(draft_ids: torch.Tensor, vocab_size: int, out_dir) -> tuple[Path, Path]:
    """speculators' d2t-N.npy / t2d-N.npy for a draft vocabulary (sorted target ids): target id = draft id +
    d2t[draft id] (int64); t2d a bool mask over the target vocabulary. The same tensors as our drafts' buffers."""
    import numpy as np

    from modules.draft.vocab import build_mappings

    ids = torch.as_tensor(draft_ids).long()
    if not bool((ids[1:] > ids[:-1]).all()):
        raise PeerFormatError("draft ids must be sorted ascending (speculators takes lm_head rows in t2d order)")
    d2t, t2d = build_mappings(ids, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = ids.numel()
    d2t_path, t2d_path = out / f"d2t-{n}.npy", out / f"t2d-{n}.npy"
    np.save(d2t_path, d2t.cpu().numpy().astype(np.int64))
    np.save(t2d_path, t2d.cpu().numpy().astype(bool))
    return d2t_path, t2d_path


@torch.no_grad()
def check_pre_norm(target, input_ids: torch.Tensor) -> dict:
    """The pre-norm trick on one sequence against a real forward of the target: the true pre-norm last state
    (a forward pre-hook on the final norm) and post / weight give the same normed state and the same logits
    (up to eps). Also the wrong convention, the post-norm state given as if pre-norm, for contrast."""
    from modules.data.features import base_model

    decoder = base_model(target)
    norm = decoder.norm
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))
    seen = {}
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("pre", args[0].detach()))
    try:
        post = decoder(input_ids=input_ids, use_cache=False).last_hidden_state.float()
    finally:
        handle.remove()
    pre_true = seen["pre"].float()
    w = norm.weight.float()
    head = target.get_output_embeddings().weight.float()
    ours = rms_norm(pre_norm_state(post, w), w, eps)
    wrong = rms_norm(post, w, eps)
    ref = rms_norm(pre_true, w, eps)
    logits_ref, logits_ours, logits_wrong = ref @ head.T, ours @ head.T, wrong @ head.T

    def bf16(x):
        return x.to(torch.bfloat16)

    def rel(x):
        return float((x.float() - ref).norm() / ref.norm())
    return {
        "tokens": int(input_ids.numel()), "eps": eps,
        "post_vs_norm_of_true_pre_max_abs": float((post - ref).abs().max()),
        "trick_normed_max_abs": float((ours - ref).abs().max()),
        "trick_normed_rel": float((ours - ref).norm() / ref.norm()),
        "trick_logits_max_abs": float((logits_ours - logits_ref).abs().max()),
        "trick_top1_agree": float((logits_ours.argmax(-1) == logits_ref.argmax(-1)).float().mean()),
        "wrong_normed_rel": float((wrong - ref).norm() / ref.norm()),
        "wrong_logits_max_abs": float((logits_wrong - logits_ref).abs().max()),
        "wrong_top1_agree": float((logits_wrong.argmax(-1) == logits_ref.argmax(-1)).float().mean()),
        # the eps effect: rms(post / w) = sqrt(ms / (ms + eps)) for the true state's mean square ms, so the trick's
        # relative error is at most ~eps / (2 ms) at the token with the smallest ms
        "eps_bound_rel": eps / (2 * float(pre_true.pow(2).mean(-1).min())),
        "norm_weight_min_abs": float(w.abs().min()), "norm_weight_max_abs": float(w.abs().max()),
        # as stored and trained: our data keeps post in bf16, the peer's files and loader are bf16 too
        "bf16_trick_normed_rel": rel(rms_norm(pre_norm_state(bf16(post), w).to(torch.bfloat16), w, eps)),
        "bf16_true_pre_normed_rel": rel(rms_norm(bf16(pre_true), w, eps)),
    }


# ---- drafts ------------------------------------------------------------------------------------

def our_config(peer_cfg: dict, target_num_hidden_layers: int | None = None):
    """Our Eagle3Draft's LlamaConfig for a speculators EAGLE-3 config.json (refused when ours cannot express it)."""
    from transformers import LlamaConfig

    from modules.draft.eagle3_draft import EAGLE3_ARCHITECTURE

    if peer_cfg.get("speculators_model_type") != PEER_EAGLE3_TYPE:
        raise PeerFormatError(f"speculators_model_type {peer_cfg.get('speculators_model_type')!r}: not an EAGLE-3 "
                              "speculators checkpoint")
    tl = dict(peer_cfg.get("transformer_layer_config") or {})
    if tl.get("model_type", "llama") != "llama":
        raise PeerFormatError(f"draft layer type {tl.get('model_type')!r}: our EAGLE-3 draft is a Llama layer")
    if int(tl.get("num_hidden_layers", 1)) != 1:
        raise PeerFormatError(f"{tl.get('num_hidden_layers')} draft layers: our EAGLE-3 draft has one")
    if peer_cfg.get("fc_norm"):
        raise PeerFormatError("fc_norm (per-layer norms before fc): not in our EAGLE-3 draft")
    ids = peer_cfg.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        raise PeerFormatError("no eagle_aux_hidden_state_layer_ids in the speculators config")
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "max_position_embeddings", "rms_norm_eps", "vocab_size", "rope_parameters",
            "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
    cfg = LlamaConfig(**{k: tl[k] for k in keep if k in tl}, num_hidden_layers=1, tie_word_embeddings=False)
    cfg.architectures = [EAGLE3_ARCHITECTURE]
    cfg.draft_vocab_size = int(peer_cfg["draft_vocab_size"])
    cfg.target_hidden_size = int(peer_cfg.get("target_hidden_size") or tl["hidden_size"])
    if target_num_hidden_layers is not None:
        cfg.target_num_hidden_layers = int(target_num_hidden_layers)
    # speculators writes vLLM's convention (an HF hidden_states index), which is also ours
    cfg.eagle_aux_hidden_state_layer_ids = [int(i) for i in ids]
    cfg.eagle_version = 3
    cfg.norm_before_residual = bool(peer_cfg.get("norm_before_residual", False))
    cfg.norm_before_fc = bool(peer_cfg.get("norm_before_fc", False))
    cfg.norm_output = bool(peer_cfg.get("norm_output", False))
    return cfg


def our_state_dict(peer_sd: dict) -> dict:
    """speculators' EAGLE-3 weight names -> ours: layers.0.* -> midlayer.*; fc, norm, lm_head, input_norm, d2t, t2d
    and embed_tokens as they are; the verifier's copies (verifier_*) dropped. Anything else is refused."""
    out = {}
    for k, v in peer_sd.items():
        if k.startswith("verifier_"):
            continue
        if k.startswith("layers.0."):
            out["midlayer." + k[len("layers.0."):]] = v
        elif k.startswith("layers."):
            raise PeerFormatError(f"{k}: our EAGLE-3 draft has one decoder layer")
        elif k.split(".")[0] in ("fc", "norm", "lm_head", "input_norm", "embed_tokens") or k in ("d2t", "t2d"):
            out[k] = v
        else:
            raise PeerFormatError(f"unknown weight {k!r} in the speculators checkpoint")
    return out


def load_speculators_eagle3(ckpt_dir, target=None, dtype=torch.float32):
    """Our Eagle3Draft with a speculators EAGLE-3 checkpoint's weights (the folder speculators' trainer saves
    per epoch). The embedding comes from the checkpoint, or from `target` (name/path/module; None = embedded)."""
    from safetensors.torch import load_file

    from modules import target_weights
    from modules.draft.eagle3_draft import Eagle3Draft

    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.json").is_file() or not (ckpt / PEER_WEIGHTS).is_file():
        raise PeerFormatError(f"{ckpt}: expected config.json and {PEER_WEIGHTS} (a speculators checkpoint folder)")
    peer_cfg = json.loads((ckpt / "config.json").read_text())
    n_layers = None
    if target is not None or not peer_cfg.get("target_num_hidden_layers"):
        n_layers = target_weights.target_config(target).num_hidden_layers
    draft = Eagle3Draft(our_config(peer_cfg, n_layers))
    sd = our_state_dict(load_file(str(ckpt / PEER_WEIGHTS)))
    if "embed_tokens.weight" not in sd:
        sd["embed_tokens.weight"], _ = target_weights.load_embed_and_head(target)
    if "d2t" not in sd:  # a full-vocabulary peer: the identity mapping
        if draft.config.draft_vocab_size != draft.config.vocab_size:
            raise PeerFormatError("a pruned draft vocabulary without d2t/t2d in the checkpoint")
        sd["d2t"], sd["t2d"] = draft.d2t, draft.t2d
    missing, unexpected = draft.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                 for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise PeerFormatError(f"{ckpt / PEER_WEIGHTS}: missing keys {missing}, unexpected keys {unexpected}")
    return draft.to(dtype).eval()
