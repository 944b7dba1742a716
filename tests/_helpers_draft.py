"""Tiny random targets (Llama / Qwen2 / Mistral) saved as real model folders, for draft tests."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)


def tiny_config(family="llama", **overrides):
    kw = dict(TINY, **overrides)
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "mistral":
        return MistralConfig(**kw)
    raise ValueError(family)


def tiny_target(family="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa")
    return model.eval()


def save_tiny_target(path, family="llama", seed=0, max_shard_size=None, **overrides):
    """Write a tiny random target to `path` (safetensors; sharded when max_shard_size is given)."""
    model = tiny_target(family, seed, **overrides)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return model
