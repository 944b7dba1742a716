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


def fake_items(target, n=6, min_len=10, max_len=24, seed=0):
    """Conversations in EagleDataset's item format, with the tiny target's real features
    (post-final-norm last hidden state) and a loss mask on the second half."""
    g = torch.Generator().manual_seed(seed)
    items = []
    with torch.no_grad():
        for i in range(n):
            T = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(0, target.config.vocab_size, (T,), generator=g)
            hs = target.model(ids[None]).last_hidden_state[0]
            mask = torch.zeros(T, dtype=torch.long)
            mask[T // 3:] = 1
            items.append({"input_ids": ids, "loss_mask": mask, "hidden_states": hs.to(torch.bfloat16),
                          "row_id": i})
    return items


def write_fake_data(folder, target, model_name, n=6, seed=0, **kw):
    """A data folder in the on-disk format of modules/data/storage.py (manifest + one shard)."""
    from modules.data import storage

    folder.mkdir(parents=True, exist_ok=True)
    items = fake_items(target, n=n, seed=seed, **kw)
    stats = storage.write_shard(folder, 0, n, items, skipped={})
    storage.write_manifest(folder, {
        "format": storage.FORMAT, "model": model_name, "dataset": "fake", "hidden_size": target.config.hidden_size,
        "vocab_size": target.config.vocab_size, "dtype": "bf16", "aux_layers": None, "max_length": 64,
        "start": 0, "end": n, "rows_written": n, "tokens": stats["tokens"],
        "trained_tokens": stats["trained_tokens"], "skipped": {},
    })
    return items


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def save_tiny_chat_target(path, tokenizer, seed=0):
    """A tiny random Llama with a real tokenizer's vocabulary and chat template (prompts go through
    the template: MT-bench benchmarks), saved with that tokenizer to `path`."""
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
