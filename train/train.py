"""Train an EAGLE-1/2 draft on data written by generate_data.py / allocation.py.

    python train/train.py                                   # embedded SmolLM2 on data_out/eagle2
    python train/train.py --data DIR1 DIR2 --model meta-llama/Llama-3.1-8B-Instruct --epochs 10
    torchrun --nproc_per_node 8 train/train.py ...          # DDP (or: accelerate launch --multi_gpu --num_processes 8 train/train.py)

Checkpoints go to OUTPUT_DIR/checkpoint-*; the final draft is exported to OUTPUT_DIR/draft in the
SGLang/vLLM layout (config.json + model.safetensors) and the official EAGLE one (pytorch_model.bin);
OUTPUT_DIR/summary.json, log_history.json and training_curves.png describe the run.
"""
import argparse
import sys
import time
from pathlib import Path

from modules.draft import kinds as draft_kinds
from modules.paths import DEFAULT_DATA_DIR, DEFAULT_TRAIN_DIR
from modules.training.setup import UsageError, check_data_fits_target, pick_attention, split, training_arguments
from modules.training.setup import run_and_finish_distributed

# ----------------------------------------------------------------------------- SETTINGS
MODEL = None              # target: hub id, local folder or .gguf; None = embedded SmolLM2-135M-Instruct
DATA = [str(DEFAULT_DATA_DIR)]   # one or more data folders (or parents of part-XXXX/ folders)
OUTPUT_DIR = str(DEFAULT_TRAIN_DIR)
EPOCHS = 4
MAX_STEPS = -1            # > 0 overrides EPOCHS
LR = 3e-4                 # small data: higher than the official 3e-5 (which used 68k conversations)
MIN_LR_RATIO = 0.1        # linear decay from LR to LR * MIN_LR_RATIO after warmup
WARMUP = 0.05             # warmup steps (>= 1) or fraction of all steps (< 1)
BATCH_SIZE = 1            # conversations per device and micro-batch (padded on the right)
GRAD_ACCUM = 4
MAX_LENGTH = 2048         # tokens per conversation (longer ones are cut)
EVAL_FRACTION = 0.02      # conversations held out for eval (top-k accuracy, simulated tau)
SIM_STEPS = 5             # chain length of the simulated acceptance length
W_REG, W_CLS = 1.0, 0.1   # SmoothL1 feature loss, soft cross-entropy weights
NOISE_STD = 0.2           # uniform noise on input features (EAGLE)
DETACH_CLS = False        # True = BaldEagle recipe (CE term gives no gradient)
BIAS = False              # fc bias: vLLM 0.32 builds fc without one (drops it), so none by default (modules/export/engines.py)
GRAD_CLIP = 0.5
PRECISION = "auto"        # auto: bf16 autocast on CUDA and on CPUs with bf16 units (~1.8x faster), else fp32
ATTN = "auto"             # auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | eager | flash_attention_2
LOGGING_STEPS = 10
SAVE_STEPS = 200
SAVE_TOTAL_LIMIT = 2      # checkpoints kept (older ones deleted); 0 = keep all
EVAL_STEPS = None         # None = at the end of every epoch
DATALOADER_WORKERS = None  # processes reading the shards per rank; None = 2 on GPU, 0 on CPU (cores compute)
PREFETCH_FACTOR = 2       # batches each worker prepares ahead (with workers > 0)
REPORT_TO = "none"        # none | tensorboard | wandb
SEED = 0
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data", nargs="+", default=DATA)
    p.add_argument("--output-dir", default=OUTPUT_DIR)
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--min-lr-ratio", type=float, default=MIN_LR_RATIO)
    p.add_argument("--warmup", type=float, default=WARMUP)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--grad-accum", type=int, default=GRAD_ACCUM)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION)
    p.add_argument("--sim-steps", type=int, default=SIM_STEPS)
    p.add_argument("--w-reg", type=float, default=W_REG)
    p.add_argument("--w-cls", type=float, default=W_CLS)
    p.add_argument("--noise-std", type=float, default=NOISE_STD)
    p.add_argument("--detach-cls", action=argparse.BooleanOptionalAction, default=DETACH_CLS,
                   help="BaldEagle recipe: detach the prediction in the CE term")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=BIAS)
    p.add_argument("--grad-clip", type=float, default=GRAD_CLIP)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=PRECISION)
    p.add_argument("--attn", default=ATTN)
    p.add_argument("--logging-steps", type=int, default=LOGGING_STEPS)
    p.add_argument("--save-steps", type=int, default=SAVE_STEPS)
    p.add_argument("--save-total-limit", type=int, default=SAVE_TOTAL_LIMIT, help="checkpoints kept; 0 = all")
    p.add_argument("--eval-steps", type=int, default=EVAL_STEPS)
    p.add_argument("--dataloader-workers", type=int, default=DATALOADER_WORKERS,
                   help="data reading processes per rank (default: 2 on GPU, 0 on CPU)")
    p.add_argument("--prefetch-factor", type=int, default=PREFETCH_FACTOR, help="batches per worker read ahead")
    p.add_argument("--report-to", default=REPORT_TO)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--resume", default=None, help="checkpoint folder, or 'auto' = the last one in --output-dir")
    p.add_argument("--allow-other-model", action="store_true",
                   help="train even if the data manifest names another target model")
    p.add_argument("--no-export", action="store_true", help="skip the export at the end")
    p.add_argument("--dump-rank-weights", action="store_true", help=argparse.SUPPRESS)  # DDP test hook
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from modules.data.collate import EagleCollator
    from modules.export.eagle_export import ExportError
    from safetensors import SafetensorError

    from modules.data.storage import DataFormatError, EagleDataset
    from modules.target import TargetLoadError, model_display_name
    from modules.target_weights import target_config
    from modules.training.eagle_trainer import EagleTrainer, NonFiniteLossError

    t0 = time.time()
    kind = draft_kinds.get("eagle2")  # EagleTrainer trains EAGLE-1/2; train_eagle_ttt.py trains every kind
    try:
        ds = EagleDataset(args.data, read_aux=False)
        display = model_display_name(args.model)
        cfg = target_config(args.model)
        check_data_fits_target(ds, cfg, display, args.allow_other_model)
        train_ds, eval_ds = split(ds, args.eval_fraction, args.seed)
        set_seed(args.seed)  # the same initial draft for the same seed (DDP also broadcasts rank 0's)
        draft = kind.build(args.model, bias=args.bias, attn_implementation=pick_attention(args.attn))
        draft.config.target_model = display
        targs = training_arguments(args, eval_ds is not None)
        resume = args.resume
        if resume == "auto":
            resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        trainer = EagleTrainer(model=draft, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                               data_collator=EagleCollator(max_length=args.max_length))
        if trainer.is_world_process_zero():
            print(f"data: {len(train_ds)} train / {len(eval_ds) if eval_ds else 0} eval conversations from "
                  f"{len(ds.folders)} folder(s); target {display} (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}); "
                  f"trainable params {sum(p.numel() for p in draft.parameters() if p.requires_grad):,}", flush=True)
        result = trainer.train(resume_from_checkpoint=resume)
    except (DataFormatError, UsageError, TargetLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SafetensorError as err:  # a shard damaged after the dataset index was read (mid-epoch)
        print(f"error: corrupt data shard in {', '.join(args.data)}: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        print(f"error: {err}; last good checkpoint: {last or 'none (no checkpoint saved yet)'}", file=sys.stderr)
        return 3
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    metrics = trainer.evaluate() if eval_ds is not None else {}
    if args.dump_rank_weights:
        from safetensors.torch import save_file
        rank = trainer.args.process_index
        save_file(trainer.draft_module().trainable_state_dict(with_embed=False),
                  str(Path(args.output_dir) / f"rank{rank}.safetensors"),
                  metadata={"world_size": str(trainer.args.world_size), "global_step": str(trainer.state.global_step)})
    if not trainer.is_world_process_zero():
        return 0
    out = Path(args.output_dir) / "draft"
    if not args.no_export:
        try:
            kind.save_trained(trainer.draft_module(), out, target=args.model)
        except ExportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from modules.training.curves import save_run_outputs
    summary = {"steps": result.global_step, "train_loss": round(result.training_loss, 5),
               "train_runtime_s": round(time.time() - t0, 1), **{k: round(v, 4) for k, v in metrics.items()},
               "draft": None if args.no_export else str(out)}
    save_run_outputs(args.output_dir, trainer.state.log_history, summary)
    return 0


if __name__ == "__main__":
    sys.exit(run_and_finish_distributed(main))
