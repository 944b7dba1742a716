"""`make gpu-probe`: what this repo's code does at Llama-3.1-8B's shapes on one GPU (docs/gpu.md).

    python benchmark/gpu_probe.py                        # 8B shapes on CUDA; OUTPUT_DIR/gpu_probe.json
    python benchmark/gpu_probe.py --shape tiny --device cpu   # the same stages on a tiny config (the CPU test)

The real weights cannot travel to a lent machine (no network there), so the target is Llama-3.1-8B's
architecture (hidden 4096, 32 layers, 8 KV heads, FFN 14336, vocabulary 128,256) with random bf16 weights,
built on the device. Random weights cost the same FLOPs and bytes as trained ones; the acceptance they give
is meaningless, so only speed and memory are reported. Stages, each through the code users run:
1. data: EAGLE-3 fused features (3 aux layers + the last hidden state, bf16) written to shards by
   modules/data/generation.generate_folder, the loop allocation.py's workers run, batched by tokens;
   tokens/s of the whole loop and of the target forward alone, and a profiler table of one forward batch.
   The conversations are synthetic chats of ShareGPT-like lengths (256..max length tokens).
2. train: train/train_eagle_ttt.py on that data, an EAGLE-3 (7 TTT steps) and a P-EAGLE draft (4 parallel
   tokens), draft vocabulary 32k, max length 2048, batch 1: tokens/s (after the profiled steps), peak GPU
   memory, and the op table of 3 profiled steps (--profile-steps).
3. decode: our decoder with the EAGLE-3 draft (tree of 60 tokens, depth 5, top-k 10: the official EAGLE-2
   shape) and the P-EAGLE draft (a chain of 4): ms per cycle (draft, target verify, the rest), plain HF greedy
   ms per token, and a profiler table of the EAGLE-3 cycles.
Prints a summary and writes OUTPUT_DIR/gpu_probe.json and OUTPUT_DIR/profile_{data,train_eagle3,train_peagle,
decode}.txt. Needs torch, transformers, accelerate, safetensors, tqdm (what the lent machine has).
"""
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the lent machine has no editable install of this repo (no .venv travels)
from modules.settings import parse_settings, setting  # noqa: E402

# Llama-3.1-8B-Instruct's config.json (the fields that set the cost); rope scaling changes no shape.
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False)
# The same stages on a config small enough for a CPU test (8 layers: distinct EAGLE-3 capture layers).
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
# Per shape: the config, then what the stages run on it.
SHAPES = {
    "llama-3.1-8b": {"config": LLAMA31_8B, "rows": 96, "max_length": 2048, "draft_vocab": 32000, "train_steps": 20,
                     "tree": (60, 5, 10), "prompt": 512, "new_tokens": 64},
    "tiny": {"config": TINY, "rows": 16, "max_length": 256, "draft_vocab": 512, "train_steps": 10,
             "tree": (16, 4, 4), "prompt": 64, "new_tokens": 16},
}
TRAIN_PROFILE_STEPS = 3  # profiled optimizer steps 3-5 (modules/training/profiling.py warms up 2 first)
TRAIN_LOGGING_STEPS = 5  # the first log window holds the warm-up and profiled steps; the rate uses the later ones


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag; --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    shape: str = setting("llama-3.1-8b", "target shape: llama-3.1-8b (Llama-3.1-8B's config, random bf16 weights) "
                                         "or tiny (a CPU-sized config, same stages)", choices=list(SHAPES))
    device: str = setting("auto", "auto (cuda when available, else cpu) | cuda | cpu")
    output_dir: str = setting("gpu_probe_out", "gpu_probe.json and the profiler tables")
    work_dir: str | None = setting(None, "scratch folder for the target's head, the data and the drafts (deleted "
                                         "at the end); None = a temporary folder")
    stages: list[str] = setting(["data", "train", "decode"], "stages to run (train needs data, decode needs train)")
    train_steps: int = setting(0, "optimizer steps per draft; 0 = the shape's (8B: 20)")
# ----------------------------------------------------------------------------- end of SETTINGS


def gb(n_bytes) -> float:
    return round(n_bytes / 2**30, 2)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_target(shape: dict, device):
    """A Llama with the shape's config and random weights, built on `device` in bf16 (sdpa attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape["config"], attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def write_target_head(model, tokenizer, folder: Path) -> str:
    """What training reads of a target (modules/target_weights.py): config, embedding, LM head, tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file({"model.embed_tokens.weight": model.model.embed_tokens.weight.detach().cpu().contiguous(),
               "lm_head.weight": model.lm_head.weight.detach().cpu().contiguous()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    return str(folder)


def synthetic_rows(tokenizer, n: int, max_length: int, seed: int = 0):
    """n two-turn chats whose token counts spread over 256..max_length (ShareGPT at 2048: ~1,170 a row)."""
    from tests._helpers_data import CORPUS

    rng = random.Random(seed)
    sample = " ".join(CORPUS)
    chars_per_token = len(sample) / len(tokenizer(sample)["input_ids"])
    rows = []
    for i in range(n):
        tokens = rng.randint(min(256, max_length // 2), max_length)
        words = []
        while len(" ".join(words)) < tokens * chars_per_token:
            words.append(rng.choice(CORPUS))
        text = " ".join(words)
        cut = len(text) // 5  # a short question, a long answer
        rows.append((i, {"id": str(i), "conversations": [{"from": "human", "value": text[:cut]},
                                                         {"from": "gpt", "value": text[cut:]}]}))
    return rows


def profiled(fn, device, rows: int = 12):
    """(fn's result, the op table of one profiled call, sorted by device time on CUDA)."""
    import torch

    from modules.training.profiling import profile_table

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        out = fn()
        sync(device)
    return out, profile_table(prof, device.type, rows)


def stage_data(model, tokenizer, head_dir, shape, work: Path, out: Path, report: dict):
    from modules.data.features import target_features
    from modules.export.engines import default_aux_layers
    from modules.data.generation import (GenerationSettings, encode_rows, generate_folder, make_batches, pad_batch,
                                         resolve_batch_tokens)

    device = next(model.parameters()).device
    rows = synthetic_rows(tokenizer, shape["rows"], shape["max_length"])
    aux = default_aux_layers(model.config.num_hidden_layers)
    settings = GenerationSettings(model=head_dir, dataset="synthetic", start=0, end=len(rows),
                                  max_length=shape["max_length"], store_dtype="bf16", aux_layers=aux)
    # the target forward alone, on the first (largest) batch: warm-up, then timed, then profiled
    examples, _, _ = encode_rows(tokenizer, rows, shape["max_length"], None)
    batch_tokens = resolve_batch_tokens(0, device)
    batch = make_batches(examples, batch_tokens)[0]
    ids, mask = pad_batch(batch, tokenizer.pad_token_id, device)
    target_features(model, ids, mask, aux)
    sync(device)
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        target_features(model, ids, mask, aux)
    sync(device)
    forward_s = (time.perf_counter() - t) / reps
    _, table = profiled(lambda: target_features(model, ids, mask, aux), device)
    (out / "profile_data.txt").write_text(f"one forward of {ids.numel():,} padded tokens ({ids.shape[0]} rows), "
                                          f"EAGLE-3 capture layers {aux}\n{table}\n")
    real = sum(len(e[1]) for e in batch)
    # the whole loop (tokenise, forward, host copy, shard writes), as allocation.py's worker runs it
    data = work / "data"
    t = time.perf_counter()
    manifest = generate_folder(model, tokenizer, rows, data, settings, progress=False)
    loop_s = time.perf_counter() - t
    report["data"] = {
        "conversations": manifest["rows_written"], "tokens": manifest["tokens"], "batch_tokens": batch_tokens,
        "aux_layers": aux, "loop_s": round(loop_s, 2),
        "loop_tokens_per_s": round(manifest["tokens"] / loop_s), "shard_gb": gb(manifest["bytes"]),
        "forward_batch": [int(ids.shape[0]), int(ids.shape[1])], "forward_s": round(forward_s, 4),
        "forward_tokens_per_s": round(real / forward_s), "forward_padded_tokens_per_s": round(ids.numel() / forward_s),
    }
    return data


def stage_train(arch: str, head_dir, data, shape, steps: int, work: Path, out: Path, report: dict, device):
    import torch

    from train import train_eagle_ttt

    run = work / f"run_{arch}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    argv = ["--model", head_dir, "--data", str(data), "--output-dir", str(run), "--arch", arch,
            "--max-steps", str(steps), "--batch-size", "1", "--grad-accum", "1",
            "--max-length", str(shape["max_length"]), "--draft-vocab-size", str(shape["draft_vocab"]),
            "--eval-fraction", "0.05", "--logging-steps", str(TRAIN_LOGGING_STEPS), "--save-steps", str(steps),
            "--profile-steps", str(TRAIN_PROFILE_STEPS), "--attn", "sdpa"]
    t = time.perf_counter()
    rc = train_eagle_ttt.main(argv)
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"train_eagle_ttt.py --arch {arch} exited with {rc}")
    history = json.loads((run / "log_history.json").read_text())
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h][1:]  # after the warm-up + profiled window
    summary = json.loads((run / "summary.json").read_text())
    shutil.copy(run / "profile.txt", out / f"profile_train_{arch}.txt")
    entry = {"steps": summary["steps"], "ttt_steps": summary["ttt_steps"], "wall_s": round(wall, 1),
             "tokens_per_s": round(sum(rates) / len(rates)) if rates else None,
             "loss": [h["loss"] for h in history if "loss" in h]}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        entry.update(peak_gb=gb(peak), resident_target_gb=gb(resident), peak_above_target_gb=gb(peak - resident))
    report.setdefault("train", {})[arch] = entry
    return run / "draft"


def stage_decode(model, drafts: dict, shape, data, out: Path, report: dict, device):
    import torch

    from benchmark.methods import run_plain
    from modules.data.storage import EagleDataset
    from modules.decode.parallel import make_decoder
    from modules.draft.kinds import kind_of
    from modules.draft.loading import load_draft

    prompt = EagleDataset([str(data)])[0]["input_ids"][:shape["prompt"]].long().tolist()
    new = shape["new_tokens"]
    eos = None  # random weights: run to new_tokens
    total, depth, top_k = shape["tree"]
    entry = {"prompt_tokens": len(prompt), "new_tokens": new}
    _, plain_s, _ = run_plain(model, prompt, 8, eos)  # warm-up
    _, plain_s, _ = run_plain(model, prompt, new, eos)
    entry["plain_ms_per_token"] = round(1000 * plain_s / new, 2)
    for arch, folder in drafts.items():
        draft = load_draft(folder, target_model=model, dtype=torch.bfloat16).to(device).eval()
        adapter = kind_of(draft).tree_adapter(draft)
        shape_args = dict(total_tokens=total, depth=depth, top_k=top_k)
        wall = make_decoder(model, adapter, **shape_args)           # no syncs: the cycle's real cost
        timed = make_decoder(model, adapter, timing=True, **shape_args)  # syncs around forwards: the split
        wall.generate(prompt, 8)
        prefill_s = wall.generate(prompt, 1).total_s  # one new token: the prefill alone, no cycle
        res = wall.generate(prompt, new)
        split = timed.generate(prompt, new)
        cycles = max(split.cycles, 1)
        entry[arch] = {"decoder": type(wall).__name__, "verified_tokens": wall.total_tokens, "cycles": res.cycles,
                       "prefill_ms": round(1000 * prefill_s, 2),
                       "ms_per_cycle": round(1000 * (res.total_s - prefill_s) / max(res.cycles, 1), 2),
                       "draft_ms_per_cycle": round(1000 * split.draft_s / cycles, 2),
                       "target_ms_per_cycle": round(1000 * split.target_s / cycles, 2),
                       "other_ms_per_cycle": round(1000 * split.overhead_s / cycles, 2),
                       "tau_random_weights": round(res.tau, 2)}
        if arch == next(iter(drafts)):  # the first draft trained (EAGLE-3): its tree cycle profiled
            _, table = profiled(lambda d=wall: d.generate(prompt, new), device)
            (out / "profile_decode.txt").write_text(f"{arch} tree decoding, {new} new tokens after a {len(prompt)}-"
                                                    f"token prompt (tree {total} tokens, depth {depth}, top-k {top_k})"
                                                    f"\n{table}\n")
        del draft, adapter, wall, timed
    report["decode"] = entry


def main(argv=None) -> int:
    import torch

    from tests._helpers_data import tiny_tokenizer

    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-probe: no CUDA (torch.cuda.is_available() is False); --shape tiny --device cpu runs the stages "
              "on CPU", file=sys.stderr)
        return 1
    shape = SHAPES[args.shape]
    steps = args.train_steps or shape["train_steps"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_probe_"))
    report = {"shape": args.shape, "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
              "torch": torch.__version__, "config": shape["config"], "stages_failed": []}
    t0 = time.perf_counter()
    try:
        t = time.perf_counter()
        model = build_target(shape, device)
        sync(device)
        report["target"] = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                            "build_s": round(time.perf_counter() - t, 1)}
        if device.type == "cuda":
            report["target"]["gpu_gb"] = gb(torch.cuda.memory_allocated(device))
        tokenizer = tiny_tokenizer("llama3")  # ids < 300: the cost does not depend on which ids
        tokenizer.pad_token = tokenizer.eos_token  # as modules.target.load_tokenizer does
        head_dir = write_target_head(model, tokenizer, work / "target_head")
        data, drafts = None, {}
        for stage in args.stages:
            print(f"gpu-probe: {stage} ...", flush=True)
            try:
                if stage == "data":
                    data = stage_data(model, tokenizer, head_dir, shape, work, out, report)
                elif stage == "train" and data is not None:
                    for arch in ("eagle3", "peagle"):
                        drafts[arch] = stage_train(arch, head_dir, data, shape, steps, work, out, report, device)
                elif stage == "decode" and drafts:
                    stage_decode(model, drafts, shape, data, out, report, device)
                else:
                    report["stages_failed"].append(f"{stage}: not run (needs an earlier stage)")
            except Exception:  # noqa: BLE001  the report must still come out, saying what broke
                report["stages_failed"].append(f"{stage}: {traceback.format_exc(limit=4)[-1500:]}")
                traceback.print_exc()
    finally:
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        (out / "gpu_probe.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n==== gpu-probe summary ====")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return 1 if report["stages_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
