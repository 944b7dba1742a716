"""Train an EAGLE-3 draft (fused features + training-time test + draft vocabulary), the pair of
train/train.py. `--arch eagle2` trains the EAGLE-1/2 draft with the same TTT loss instead.

    python train/train_eagle_ttt.py                      # embedded SmolLM2 on data_out/eagle3
    python train/train_eagle_ttt.py --online --end 2000  # no stored features: the target runs in the loop
    python train/train_eagle_ttt.py --arch eagle2 --data data_out/eagle2
    torchrun --nproc_per_node 8 train/train_eagle_ttt.py ...

Offline data comes from generate_data_fused_features.py (EAGLE-3) or generate_data.py (eagle2
arch). With --online, conversations are read from --dataset, tokenised with the same loss mask, and
the target computes the features of each batch (modules/features.target_features) on the fly.
The draft vocabulary is counted from the training conversations' trained tokens before training.
Checkpoints: OUTPUT_DIR/checkpoint-*; final draft: OUTPUT_DIR/draft (SGLang EAGLE-3 layout, or
the EAGLE layouts of train/export.py for --arch eagle2); summary.json, log_history.json (per-step
losses/accuracies) and training_curves.png describe the run.
"""
import argparse
import sys
import time
from pathlib import Path

from modules.draft import kinds as draft_kinds
from modules.paths import DEFAULT_FUSED_DATA_DIR, DEFAULT_TTT_TRAIN_DIR
from modules.training.setup import UsageError, check_data_fits_target, pick_attention, split, training_arguments
from modules.training.setup import run_and_finish_distributed

# ----------------------------------------------------------------------------- SETTINGS
ARCH = "eagle3"           # eagle3 | eagle2 (EAGLE-1/2 draft with the TTT loss)
MODEL = None              # target: hub id, local folder or .gguf; None = embedded SmolLM2-135M-Instruct
DATA = [str(DEFAULT_FUSED_DATA_DIR)]   # offline data folders (ignored with --online)
OUTPUT_DIR = str(DEFAULT_TTT_TRAIN_DIR)
TTT_STEPS = 7             # unrolled draft steps (official EAGLE-3: 7)
TTT_DECAY = 0.8           # step k's loss weight: TTT_DECAY ** k
DRAFT_VOCAB_SIZE = None   # None = smallest N covering DRAFT_VOCAB_COVERAGE of the trained tokens
DRAFT_VOCAB_COVERAGE = 0.95
EPOCHS = 4
MAX_STEPS = -1            # > 0 overrides EPOCHS
LR = 3e-4                 # as train/train.py (small data)
MIN_LR_RATIO = 0.1
WARMUP = 0.05
BATCH_SIZE = 1
GRAD_ACCUM = 4
MAX_LENGTH = 2048
EVAL_FRACTION = 0.02
SIM_STEPS = 5
W_REG, W_CLS, NOISE_STD = None, None, None  # None = the kind's loss_weights: eagle3 (0, 1, 0), eagle2 (1, 0.1, 0.2)
GRAD_CLIP = 0.5
PRECISION = "auto"
ATTN = "auto"             # TTT attention: eager = the reference ([heads, T, T] scores per step); anything else
                          # (auto, sdpa, flash_attention_2) = SDPA kernels, no T x T matrix (modules/draft/ttt_attention.py)
LOGGING_STEPS = 10
SAVE_STEPS = 200
SAVE_TOTAL_LIMIT = 2      # checkpoints kept (older ones deleted); 0 = keep all
EVAL_STEPS = None
DATALOADER_WORKERS = None  # processes reading the shards per rank; None = 2 on GPU, 0 on CPU
PREFETCH_FACTOR = 2       # batches each worker prepares ahead (with workers > 0)
REPORT_TO = "none"
SEED = 0
# online training only
ONLINE = False
DATASET = "sharegpt"      # as generate_data.py: sharegpt (embedded), ultrachat, a .json/.jsonl file, hub id
START, END = 0, 2000
AUX_LAYERS = None         # None = official [2, N//2, N-3]
TARGET_DTYPE = "auto"     # dtype the target runs in (auto: bf16 on GPU / bf16-capable CPUs)
SYSTEM_PROMPT = None
REGENERATE = False        # replace assistant replies by the target's own first (modules/data/regenerate.py)
TEMPERATURE = 0.8
MAX_NEW_TOKENS = 512
# ----------------------------------------------------------------------------- end of SETTINGS

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--arch", choices=list(draft_kinds.KINDS), default=ARCH)
    a("--model", default=MODEL)
    a("--data", nargs="+", default=DATA)
    a("--output-dir", default=OUTPUT_DIR)
    a("--ttt-steps", type=int, default=TTT_STEPS)
    a("--ttt-decay", type=float, default=TTT_DECAY)
    a("--draft-vocab-size", type=int, default=DRAFT_VOCAB_SIZE, help="N most frequent trained tokens (eagle3)")
    a("--draft-vocab-coverage", type=float, default=DRAFT_VOCAB_COVERAGE, help="used when no size is given")
    a("--epochs", type=float, default=EPOCHS)
    a("--max-steps", type=int, default=MAX_STEPS)
    a("--lr", type=float, default=LR)
    a("--min-lr-ratio", type=float, default=MIN_LR_RATIO)
    a("--warmup", type=float, default=WARMUP)
    a("--batch-size", type=int, default=BATCH_SIZE)
    a("--grad-accum", type=int, default=GRAD_ACCUM)
    a("--max-length", type=int, default=MAX_LENGTH)
    a("--eval-fraction", type=float, default=EVAL_FRACTION)
    a("--sim-steps", type=int, default=SIM_STEPS)
    a("--w-reg", type=float, default=W_REG, help="SmoothL1 feature loss weight (default per arch)")
    a("--w-cls", type=float, default=W_CLS, help="cross-entropy weight (default per arch)")
    a("--noise-std", type=float, default=NOISE_STD, help="input feature noise (default per arch)")
    a("--bias", action=argparse.BooleanOptionalAction, default=False, help="fc bias (eagle2 arch; vLLM serves none)")
    a("--grad-clip", type=float, default=GRAD_CLIP)
    a("--precision", choices=["auto", "bf16", "fp32"], default=PRECISION)
    a("--attn", default=ATTN, help="auto | sdpa | eager | flash_attention_2 (TTT attention: eager or SDPA)")
    a("--logging-steps", type=int, default=LOGGING_STEPS)
    a("--save-steps", type=int, default=SAVE_STEPS)
    a("--save-total-limit", type=int, default=SAVE_TOTAL_LIMIT, help="checkpoints kept; 0 = all")
    a("--eval-steps", type=int, default=EVAL_STEPS)
    a("--dataloader-workers", type=int, default=DATALOADER_WORKERS,
      help="data reading processes per rank (default: 2 on GPU, 0 on CPU)")
    a("--prefetch-factor", type=int, default=PREFETCH_FACTOR, help="batches per worker read ahead")
    a("--report-to", default=REPORT_TO)
    a("--seed", type=int, default=SEED)
    a("--resume", default=None, help="checkpoint folder, or 'auto' = the last one in --output-dir")
    a("--allow-other-model", action="store_true", help="train even if the data manifest names another target")
    a("--no-export", action="store_true")
    o = p.add_argument_group("online training (features computed by the target inside the loop)")
    o.add_argument("--online", action=argparse.BooleanOptionalAction, default=ONLINE)
    o.add_argument("--dataset", default=DATASET)
    o.add_argument("--start", type=int, default=START)
    o.add_argument("--end", type=int, default=END)
    o.add_argument("--aux-layers", type=int, nargs=3, default=AUX_LAYERS, help="hidden_states ids (low mid high)")
    o.add_argument("--target-dtype", default=TARGET_DTYPE)
    o.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    o.add_argument("--regenerate", action=argparse.BooleanOptionalAction, default=REGENERATE)
    o.add_argument("--temperature", type=float, default=TEMPERATURE)
    o.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = p.parse_args(argv)
    for k, v in draft_kinds.get(args.arch).loss_weights.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.detach_cls = False
    return args


class ListDataset:
    """Tokenised conversations for online training: {"input_ids", "loss_mask", "row_id"}."""

    def __init__(self, examples):
        import torch
        self.items = [{"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask), "row_id": r}
                      for r, ids, mask in examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def online_data(args):
    """(dataset of token ids + loss masks, target model) for --online. The target is whole on this
    rank's device (cuda:LOCAL_RANK under torchrun, modules/placement.py), where the trainer puts the draft."""
    from modules.data.chat import load_rows
    from modules.data.generation import encode_rows
    from modules.placement import process_ranks
    from modules.target import load_target

    target, tokenizer = load_target(args.model, dtype=args.target_dtype)
    rows = load_rows(args.dataset, args.start, args.end)
    if args.regenerate:  # each rank regenerates its share into its own file, then reads all of them
        from modules.data.regenerate import LocalGenerator, regenerate_sharded
        rank, world = process_ranks()
        gen = LocalGenerator(target, tokenizer, args.temperature, args.max_new_tokens, args.max_length, args.seed)
        rows = regenerate_sharded(rows, gen, args.output_dir, f"regenerated-{args.start}-{args.end}", rank, world,
                                  args.system_prompt, progress=rank == 0)
    examples, skipped, _ = encode_rows(tokenizer, rows, args.max_length, args.system_prompt)
    if not examples:
        raise RuntimeError(f"no usable conversations in rows {args.start}-{args.end} of {args.dataset} ({dict(skipped)})")
    print(f"online: {len(examples)} conversations tokenised, skipped {dict(skipped)}", flush=True)
    return ListDataset(examples), target


def draft_vocab_ids(args, ds, vocab_size):
    """Target ids of the draft vocabulary, counted over the training conversations' trained tokens."""
    from modules.draft.vocab import count_tokens, select_draft_vocab, shard_token_pairs

    if args.online:
        pairs = ((it["input_ids"], it["loss_mask"]) for it in ds.items)
    else:
        pairs = shard_token_pairs(ds.folders)
    counts = count_tokens(pairs, vocab_size)
    ids, covered = select_draft_vocab(counts, size=args.draft_vocab_size, coverage=args.draft_vocab_coverage)
    print(f"draft vocab: {len(ids):,} of {vocab_size:,} target tokens cover {covered:.2%} of "
          f"{int(counts.sum()):,} trained tokens", flush=True)
    return ids, covered


def ttt_arguments(args, has_eval):
    """train.py's TrainingArguments, plus the TTT fields."""
    import dataclasses

    from modules.training.ttt_trainer import TTTTrainingArguments

    base = training_arguments(args, has_eval)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    fields.update(ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay)
    return TTTTrainingArguments(**fields)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from modules.data.features import default_aux_layers
    from modules.placement import output_device
    from modules.data.storage import DataFormatError, EagleDataset
    from modules.target import TargetLoadError, model_display_name
    from modules.target_weights import load_embed_and_head, target_config
    from modules.training.eagle_trainer import NonFiniteLossError
    from modules.training.ttt_trainer import TTTCollator, TTTTrainer

    t0 = time.time()
    kind = draft_kinds.get(args.arch)
    display = model_display_name(args.model)
    try:
        cfg = target_config(args.model)
        target = None
        if args.online:
            ds, target = online_data(args)
            aux_layers = args.aux_layers or default_aux_layers(cfg.num_hidden_layers)
        else:
            ds = EagleDataset(args.data, read_aux=kind.fused_features)
            check_data_fits_target(ds, cfg, display, args.allow_other_model)
            aux_layers = ds.aux_layers
            if kind.fused_features and not ds.has_aux:
                raise UsageError(f"{ds.folders[0] / 'manifest.json'}: no fused features (aux_layers is null): "
                                 f"generate with generate_data_fused_features.py, or train with --online")
        train_ds, eval_ds = split(ds, args.eval_fraction, args.seed)
        embed, head = load_embed_and_head(args.model)
        ids, covered = draft_vocab_ids(args, ds, cfg.vocab_size) if kind.own_vocab else (None, 1.0)
        draft = kind.build(cfg, weights=(embed, head), draft_ids=ids, aux_layers=aux_layers, bias=args.bias)
        draft.config.target_model = display
        target_head = head if kind.own_vocab else None  # a draft vocabulary trains against the target's head
        draft.config._attn_implementation = pick_attention(args.attn)
        targs = ttt_arguments(args, eval_ds is not None)
        resume = args.resume
        if resume == "auto":
            resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        trainer = TTTTrainer(model=draft, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=TTTCollator(max_length=args.max_length), target_head=target_head,
                             target=target, online=args.online)
        if target is not None and output_device(target) != trainer.args.device:  # one rule: modules/placement.py
            raise UsageError(f"the online target is on {output_device(target)} but the draft trains on "
                             f"{trainer.args.device}")
        if trainer.is_world_process_zero():
            print(f"{args.arch} + TTT ({args.ttt_steps} steps): {len(train_ds)} train / "
                  f"{len(eval_ds) if eval_ds else 0} eval conversations, {'online' if args.online else 'offline'} "
                  f"features; trainable params {sum(p.numel() for p in draft.parameters() if p.requires_grad):,}",
                  flush=True)
        result = trainer.train(resume_from_checkpoint=resume)
    except (DataFormatError, UsageError, TargetLoadError, ValueError, RuntimeError) as err:
        if isinstance(err, NonFiniteLossError):
            last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
            print(f"error: {err}; last good checkpoint: {last or 'none'}", file=sys.stderr)
            return 3
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    metrics = trainer.evaluate() if eval_ds is not None else {}
    if not trainer.is_world_process_zero():
        return 0
    out = Path(args.output_dir) / "draft"
    if not args.no_export:
        kind.save_trained(trainer.draft_module(), out, target=args.model)
    summary = {"arch": args.arch, "ttt_steps": args.ttt_steps, "online": args.online, "steps": result.global_step,
               "train_loss": round(result.training_loss, 5), "draft_vocab_coverage": round(covered, 4),
               "train_runtime_s": round(time.time() - t0, 1), **{k: round(v, 4) for k, v in metrics.items()},
               "draft": None if args.no_export else str(out)}
    from modules.training.curves import save_run_outputs
    save_run_outputs(args.output_dir, trainer.state.log_history, summary,
                     title=f"{args.arch} + TTT ({args.ttt_steps} steps): loss, step-0 accuracy, simulated tau")
    return 0


if __name__ == "__main__":
    sys.exit(run_and_finish_distributed(main))
