"""Training setup shared by train/train.py and train/train_eagle_ttt.py: checks of the data against
the target, the train/eval split, the HF TrainingArguments built from the script settings, and the
attention implementation."""
import importlib.util
import os
import random


class UsageError(RuntimeError):
    """Bad input found before training: printed as one line, exit code 2."""


def check_data_fits_target(ds, target_cfg, model_display, allow_other_model):
    """Data made for another target (hidden size, vocab, name in the manifest) is refused."""
    where = ds.folders[0] / "manifest.json"
    if ds.hidden_size != target_cfg.hidden_size:
        raise UsageError(f"{where}: hidden_size {ds.hidden_size} but the target '{model_display}' has "
                         f"{target_cfg.hidden_size}: data was generated for another model")
    for m, folder in zip(ds.manifests, ds.folders):
        vocab = m.get("vocab_size") or m.get("tokenizer_vocab_size")
        if vocab and int(vocab) > target_cfg.vocab_size:
            raise UsageError(f"{folder / 'manifest.json'}: tokenizer vocab {vocab} > target vocab "
                             f"{target_cfg.vocab_size}: data was generated for another model")
    if ds.model_name != model_display and not allow_other_model:
        raise UsageError(f"{where}: data was generated for model '{ds.model_name}', training for "
                         f"'{model_display}' (pass --allow-other-model if they are the same weights)")


def split(ds, eval_fraction, seed):
    """Random conversation-level split (the same on every rank: seeded)."""
    import torch

    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    n_eval = 0 if eval_fraction <= 0 or len(idx) < 2 else max(1, round(eval_fraction * len(idx)))
    return torch.utils.data.Subset(ds, idx[n_eval:]), (torch.utils.data.Subset(ds, idx[:n_eval]) if n_eval else None)


def training_arguments(args, has_eval):
    import torch
    from modules.training.eagle_trainer import EagleTrainingArguments

    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    from modules.target import cpu_has_fast_bf16
    bf16 = args.precision == "bf16" or (args.precision == "auto" and (cuda or cpu_has_fast_bf16()))
    # Workers read the memory-mapped shards (each opens its own maps) while the GPU trains; on CPU
    # the cores are busy with the training itself.
    workers = args.dataloader_workers if args.dataloader_workers is not None else (2 if cuda else 0)
    return EagleTrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_grad_norm=args.grad_clip,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, bf16=bf16, use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and distributed else None, ddp_find_unused_parameters=False,
        w_reg=args.w_reg, w_cls=args.w_cls, noise_std=args.noise_std, detach_cls_pred=args.detach_cls,
        sim_steps=args.sim_steps, logging_steps=args.logging_steps, save_strategy="steps",
        save_steps=args.save_steps, save_total_limit=args.save_total_limit or None,
        eval_strategy=("no" if not has_eval else "steps" if args.eval_steps else "epoch"),
        eval_steps=args.eval_steps, report_to=args.report_to, seed=args.seed,
        dataloader_num_workers=workers, dataloader_prefetch_factor=args.prefetch_factor if workers else None,
        dataloader_persistent_workers=workers > 0, remove_unused_columns=False,
    )


def pick_attention(attn):
    import torch

    if attn != "auto":
        return attn
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def run_and_finish_distributed(main):
    """main()'s exit code, after tearing the process group down (under torchrun / accelerate): left to
    interpreter exit, gloo's threads can abort a rank that already finished its work."""
    import torch.distributed as dist

    try:
        return main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
