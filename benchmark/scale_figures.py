"""Scale-out figures computed from the code (docs/gpu.md "Scaling out"): parameter counts, memory per GPU,
disk per token and compute bounds for Llama-3.1-8B and -70B targets. Nothing is downloaded and no GPU
is needed: targets and drafts are built on the meta device from their configs, and the bytes per
token are those of the tensors modules/data/storage.py packs into a shard.

    python benchmark/scale_figures.py                      # H100-class GPU: 989 bf16 TFLOP/s, 80 GB
    python benchmark/scale_figures.py --gpu-tflops 989 --gpu-memory-gb 141 --max-length 4096

The compute bounds are upper bounds (every matmul at the GPU's peak); measured throughput is lower.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from modules.settings import like, parse_settings, setting
from modules.training.settings import TTTSettings

# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--gpu-memory-gb 141); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    gpu_tflops: float = setting(989.0, "dense bf16 peak of one GPU (H100 SXM); the bounds scale with it")
    gpu_memory_gb: float = setting(80.0, "memory of one GPU")
    max_length: int = setting(2048, "tokens per conversation (attention cost)")
    batch_tokens: int = setting(8192, "padded tokens per data-generation forward (the generators' GPU auto value is "
                                      "16384; 8192 is what these figures were recorded with)")
    draft_vocab: int = setting(32000, "EAGLE-3 draft vocabulary")
    ttt_steps: int = like(TTTSettings, "ttt_steps")
    json: str | None = setting(None, "also write the figures to this file")


TARGETS = {  # Llama-3.1 shapes (the hub configs' values)
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-70B": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
# ----------------------------------------------------------------------------- end of SETTINGS

GB = 1e9


def count(module, trainable=None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def bytes_per_token(hidden: int, fused: bool, tokens: int = 64) -> float:
    """Shard bytes per token (bf16 features), from the tensors modules/data/storage.pack_conversations packs;
    the 16 bytes per conversation (offset + row id) and the shard's header are left out."""
    import torch

    from modules.data.storage import pack_conversations

    conv = {"input_ids": torch.zeros(tokens, dtype=torch.long), "loss_mask": torch.zeros(tokens, dtype=torch.long),
            "hidden_states": torch.zeros(tokens, hidden), "row_id": 0}
    if fused:
        conv["aux_hidden_states"] = torch.zeros(tokens, 3 * hidden)
    tensors = pack_conversations([conv])
    index = tensors["offsets"].nbytes + tensors["row_ids"].nbytes
    return (sum(t.nbytes for t in tensors.values()) - index) / tokens


def figures(name: str, shape: dict, args) -> dict:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from modules.draft.eagle3_draft import Eagle3Draft
    from modules.draft.eagle_draft import EagleDraft

    cfg = LlamaConfig(**shape)
    h, layers, T = cfg.hidden_size, cfg.num_hidden_layers, args.max_length
    with init_empty_weights():  # parameters on the meta device (no memory), buffers real
        target = AutoModelForCausalLM.from_config(cfg)
        eagle3 = Eagle3Draft.from_target(cfg, draft_ids=torch.arange(args.draft_vocab), load_weights=False)
        eagle2 = EagleDraft.from_target(cfg, bias=True, load_head=False)
    params = count(target)
    body = count(target.model.layers) + count(target.model.norm)  # the matmuls of a forward (no LM head)
    # forward FLOPs per token: 2 per matmul weight, plus causal attention (QK^T and AV over T/2 keys on average)
    forward_flops = 2 * body + 2 * layers * T * h
    # EAGLE-3 TTT per token: fc once, then the midlayer and the draft head at every step; backward = 2x forward
    e3 = {n: count(getattr(eagle3, n)) for n in ("fc", "midlayer", "lm_head")}
    ttt_flops = 3 * (2 * e3["fc"] + args.ttt_steps * (2 * (e3["midlayer"] + e3["lm_head"]) + 2 * T * h))
    peak = args.gpu_tflops * 1e12
    # training state: fp32 weights + grads + Adam m, v of the trainable parameters (16 B each); the frozen
    # ones in bf16 (EagleTrainer keeps them in the autocast dtype); the target head the TTT loss reads (bf16)
    def train_state(draft, target_head: bool) -> float:
        return 16 * count(draft, True) + 2 * count(draft, False) + (2 * cfg.vocab_size * h if target_head else 0)

    return {
        "target": name, "params": params, "target_bf16_gb": 2 * params / GB,
        "gpus_for_weights": 2 * params / GB / args.gpu_memory_gb,
        "bytes_per_token_eagle2": bytes_per_token(h, False), "bytes_per_token_eagle3": bytes_per_token(h, True),
        # fused data: the forward keeps every layer's output (output_hidden_states) for a batch, in bf16
        "hidden_states_gb": 2 * (layers + 1) * args.batch_tokens * h / GB,
        "forward_gflop_per_token": forward_flops / 1e9, "forward_tokens_s_bound": peak / forward_flops,
        "eagle3_trainable": count(eagle3, True), "eagle2_trainable": count(eagle2, True),
        "eagle3_train_state_gb": train_state(eagle3, True) / GB,
        "eagle2_train_state_gb": train_state(eagle2, False) / GB,
        "eagle3_grad_allreduce_gb": 4 * count(eagle3, True) / GB,
        "ttt_gflop_per_token": ttt_flops / 1e9, "ttt_tokens_s_bound": peak / ttt_flops,
        "online_tokens_s_bound": peak / (ttt_flops + forward_flops),
        # --online: the whole target on every rank, next to the draft's training state
        "online_memory_gb": (2 * params + train_state(eagle3, True)) / GB,
    }


def print_table(rows: list[dict], args) -> None:
    print(f"GPU: {args.gpu_tflops:g} bf16 TFLOP/s peak, {args.gpu_memory_gb:g} GB; max length {args.max_length}, "
          f"batch {args.batch_tokens} tokens, "
          f"EAGLE-3 draft vocab {args.draft_vocab}, {args.ttt_steps} TTT steps")
    for r in rows:
        print(f"\n{r['target']}: {r['params'] / 1e9:.2f}B params, bf16 weights {r['target_bf16_gb']:.1f} GB "
              f"({r['gpus_for_weights']:.2f} GPUs of weights alone)")
        print(f"  disk: EAGLE-1/2 data {r['bytes_per_token_eagle2']:,.0f} B/token, EAGLE-3 fused data "
              f"{r['bytes_per_token_eagle3']:,.0f} B/token (+16 B per conversation)")
        print(f"  data generation: {r['forward_gflop_per_token']:.1f} GFLOP/token -> <= "
              f"{r['forward_tokens_s_bound']:,.0f} tokens/s per GPU = <= "
              f"{r['forward_tokens_s_bound'] * r['bytes_per_token_eagle3'] / GB:.2f} GB/s of EAGLE-3 data "
              f"({r['forward_tokens_s_bound'] * r['bytes_per_token_eagle2'] / GB:.2f} GB/s EAGLE-1/2); "
              f"EAGLE-3 data keeps {r['hidden_states_gb']:.1f} GB of layer outputs per {args.batch_tokens}-token batch")
        print(f"  EAGLE-3 draft: {r['eagle3_trainable'] / 1e6:,.0f}M trainable, training state "
              f"{r['eagle3_train_state_gb']:.1f} GB per GPU (+ activations), all-reduce "
              f"{r['eagle3_grad_allreduce_gb']:.2f} GB of fp32 gradients per step")
        print(f"  EAGLE-1/2 draft: {r['eagle2_trainable'] / 1e6:,.0f}M trainable, training state "
              f"{r['eagle2_train_state_gb']:.1f} GB per GPU (+ activations)")
        print(f"  TTT training: {r['ttt_gflop_per_token']:.1f} GFLOP/token -> <= {r['ttt_tokens_s_bound']:,.0f} "
              f"tokens/s per GPU offline, <= {r['online_tokens_s_bound']:,.0f} online (target forward included)")
        fits = "fits" if r["online_memory_gb"] < args.gpu_memory_gb else "does NOT fit"
        print(f"  --online EAGLE-3: target + training state = {r['online_memory_gb']:.1f} GB per rank (+ activations): "
              f"{fits} in {args.gpu_memory_gb:g} GB")


def main(argv=None) -> int:
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    rows = [figures(name, shape, args) for name, shape in TARGETS.items()]
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "targets": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
