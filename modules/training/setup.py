"""Training setup shared by train/train.py and train/train_eagle_ttt.py: checks of the data against
the target, the train/eval split, the HF TrainingArguments built from the script settings
(modules/training/settings.py), the attention implementation and the checkpoint to resume from."""
import importlib.util
import os
import random
from pathlib import Path


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


def split(ds, eval_fraction, seed, train_conversations=0):
    """Random conversation-level split (the same on every rank: seeded). train_conversations > 0 keeps
    only the first N training conversations: smaller runs train on nested subsets, evaluated on the
    same held-out conversations."""
    import torch

    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    n_eval = 0 if eval_fraction <= 0 or len(idx) < 2 else max(1, round(eval_fraction * len(idx)))
    train_idx = idx[n_eval:]
    if train_conversations > 0:
        if train_conversations > len(train_idx):
            raise UsageError(f"--train-conversations {train_conversations}: the data has only {len(train_idx)} "
                             f"training conversations ({len(ds)} in all, {n_eval} held out for eval)")
        train_idx = train_idx[:train_conversations]
    return torch.utils.data.Subset(ds, train_idx), (torch.utils.data.Subset(ds, idx[:n_eval]) if n_eval else None)


def training_arguments(settings, has_eval, cls=None):
    """The HF TrainingArguments (`cls`, default EagleTrainingArguments) of a script's settings
    (modules/training/settings.py): the settings marked `hf=` pass unchanged, the rest are decided here."""
    import torch
    from modules.target import cpu_has_fast_bf16
    from modules.training.eagle_trainer import EagleTrainingArguments
    from modules.training.settings import hf_arguments

    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and (cuda or cpu_has_fast_bf16()))
    # Workers read the memory-mapped shards (each opens its own maps) while the GPU trains; on CPU
    # the cores are busy with the training itself.
    workers = settings.dataloader_workers if settings.dataloader_workers is not None else (2 if cuda else 0)
    if settings.fsdp and not cuda:  # accelerate 1.15 turns FSDP on for accelerator process groups only
        raise UsageError("--fsdp needs CUDA GPUs: on CPU accelerate trains the ranks under DDP (drop --fsdp)")
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2}} if settings.fsdp else {}
    return (cls or EagleTrainingArguments)(
        **fsdp,
        **hf_arguments(settings), per_device_eval_batch_size=settings.batch_size,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, bf16=bf16, use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and distributed else None, ddp_find_unused_parameters=False,
        save_strategy="steps", save_total_limit=settings.save_total_limit or None,
        eval_strategy=("no" if not has_eval else "steps" if settings.eval_steps else "epoch"),
        dataloader_num_workers=workers, dataloader_prefetch_factor=settings.prefetch_factor if workers else None,
        dataloader_persistent_workers=workers > 0, remove_unused_columns=False,
        # on CUDA: batches from pinned memory (the Trainer's default) copied without blocking the host
        dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda},
    )


def resume_checkpoint(resume, output_dir):
    """The checkpoint --resume names: a folder, None, or 'auto' = the last checkpoint-* in output_dir (None if none)."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "auto":
        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return resume


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
