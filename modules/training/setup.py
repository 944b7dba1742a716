"""Training setup shared by train/train.py and train/train_eagle_ttt.py: checks of the data against
the target, the train/eval split, the HF TrainingArguments built from the script settings
(modules/training/settings.py), the attention implementation and the checkpoint to resume from."""
import importlib.util
import os
import random
from pathlib import Path


class UsageError(RuntimeError):
    """Bad input found before training: printed as one line, exit code 2."""


def check_data_fits_target(ds, target_cfg, model_display, allow_other_model, max_length=None, aux_layers=None):
    """Training's settings against the data's manifests, the one place that compares them. Data made for another
    target (hidden size, vocab, name) or with other capture layers (--aux-layers) is refused in one line; a
    --max-length other than the data's is adapted to and said in one line (the rows were cut at the data's:
    training cuts them shorter, or changes nothing)."""
    where = ds.folders[0] / "manifest.json"
    if aux_layers is not None and ds.aux_layers and list(aux_layers) != list(ds.aux_layers):
        raise UsageError(f"{where}: the data's capture layers are {ds.aux_layers}, training asks for "
                         f"--aux-layers {' '.join(map(str, aux_layers))}: drop the flag or regenerate the data")
    data_length = max(int(m.get("max_length") or 0) for m in ds.manifests)
    if max_length and data_length and max_length != data_length and int(os.environ.get("RANK", "0")) == 0:
        effect = (f"training cuts them to {max_length}" if max_length < data_length
                  else f"--max-length {max_length} changes nothing")
        print(f"note: {where}: the data's conversations were cut at max_length {data_length}; {effect}", flush=True)
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


def exit_code(err, args) -> int | None:
    """The training scripts' error ladder, one for both: an error a user can fix is one line on stderr and exit
    code 2 (3: a non-finite loss, with the last good checkpoint); None for any other error (raise it)."""
    import sys

    from safetensors import SafetensorError

    from modules.data.chat import DatasetError
    from modules.data.feature_server import FeatureServerError
    from modules.data.regenerate import RegenerationError
    from modules.data.storage import DataFormatError
    from modules.draft.eagle_draft import ExportError
    from modules.target import TargetLoadError
    from modules.training.eagle_trainer import NonFiniteLossError

    if isinstance(err, NonFiniteLossError):
        last = resume_checkpoint("auto", args.output_dir)
        print(f"error: {err}; last good checkpoint: {last or 'none (no checkpoint saved yet)'}", file=sys.stderr)
        return 3
    if isinstance(err, SafetensorError):  # a shard damaged after the dataset index was read (mid-epoch)
        print(f"error: corrupt data shard in {', '.join(args.data)}: {err}", file=sys.stderr)
        return 2
    if isinstance(err, (DataFormatError, UsageError, TargetLoadError, DatasetError, RegenerationError,
                        FileNotFoundError, FeatureServerError, ExportError)):
        print(f"error: {err}", file=sys.stderr)
        return 2
    return None


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
