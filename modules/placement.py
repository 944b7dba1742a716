"""Where models live: the one rule every script follows.

- One device per process. `--device auto` is the GPU of this process when there is one: cuda:LOCAL_RANK
  under torchrun / accelerate launch (LOCAL_RANK set), else cuda:0; cpu on machines without GPUs.
  `--device cuda` is the same without the CPU fallback; `cuda:N` and `cpu` are taken as given.
- A target is spread over every visible GPU (transformers `device_map="auto"`) only when asked
  (`--spread-target`), and never by several ranks at once (they would all share the same GPUs).
- The draft, the features handed to it and the tree decoder live on the target's OUTPUT device, its
  LM head's device (`output_device`): for a one-device target that is the process device; for a
  spread target the features of layers on other GPUs are gathered there (modules/data/features.py).
- GPU ids given by users (`allocation.py --gpus`, `--gpu_index`) are indexes into the GPUs this
  process sees: with CUDA_VISIBLE_DEVICES=4,5 already set, 0 and 1 mean physical 4 and 5.
"""
import os

import torch


class PlacementError(ValueError):
    """A device setting that cannot work here (one line, meant for users)."""


def plan_device(device: str | None = "auto", cuda_count: int = 0, local_rank: int | None = None,
                world_size: int = 1, spread: bool = False) -> torch.device:
    """The device of this process (where inputs go), from the settings and the machine alone.

    device: auto | cpu | cuda | cuda:N; cuda_count: GPUs visible to this process; local_rank: the
    launcher's LOCAL_RANK (None when not launched by torchrun); world_size: processes in the job;
    spread: the target is spread over every visible GPU (its inputs then start on cuda:0).
    """
    name = str(device or "auto")
    if name == "auto":
        name = "cuda" if cuda_count > 0 else "cpu"
    if spread:
        if name != "cuda" or cuda_count == 0:
            raise PlacementError(f"--spread-target spreads the target over every visible GPU: it needs --device auto "
                                 f"or cuda on a machine with GPUs (device {device}, {cuda_count} GPUs visible)")
        if world_size > 1:
            raise PlacementError(f"--spread-target with {world_size} processes: every rank would spread its target "
                                 f"over the same GPUs; run one process per group of GPUs "
                                 f"(allocation.py --gpus 0,1 2,3)")
        return torch.device("cuda", 0)
    if name == "cuda":
        if cuda_count == 0:
            raise PlacementError("--device cuda but no GPU is visible to this process")
        index = local_rank or 0
        if index >= cuda_count:
            raise PlacementError(f"LOCAL_RANK {index} but this process sees only {cuda_count} GPU(s)")
        return torch.device("cuda", index)
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index >= cuda_count:
        raise PlacementError(f"--device {name} but this process sees only {cuda_count} GPU(s)")
    return dev


def process_ranks() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) set by torchrun / accelerate launch; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(device: str | None = "auto", spread: bool = False) -> torch.device:
    """plan_device for this process: its visible GPUs and the launcher's LOCAL_RANK / WORLD_SIZE."""
    local_rank = os.environ.get("LOCAL_RANK")
    return plan_device(device, torch.cuda.device_count(), None if local_rank is None else int(local_rank),
                       process_ranks()[1], spread)


def output_device(model) -> torch.device:
    """Where a loaded target's outputs meet: its LM head's device. Drafts, features and the decoder go here."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight.device
    return next(model.parameters()).device


def same_device(a, b) -> bool:
    """a and b are one device: the same GPU, or both the CPU (HF's Trainer names it cpu:0 under torchrun)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def visible_gpus(env: dict | None = None) -> list[str] | None:
    """The physical GPU ids behind logical indexes 0, 1, ... (CUDA_VISIBLE_DEVICES); None when unset."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def physical_gpus(logical: list[int], env: dict | None = None) -> list[str]:
    """Logical GPU indexes of this process -> the ids to put into a child's CUDA_VISIBLE_DEVICES."""
    visible = visible_gpus(env)
    if visible is None:
        return [str(i) for i in logical]
    bad = [i for i in logical if not 0 <= i < len(visible)]
    if bad:
        raise PlacementError(f"GPU index {bad[0]} but CUDA_VISIBLE_DEVICES={','.join(visible)} "
                             f"shows {len(visible)} GPU(s) (indexes 0-{len(visible) - 1})")
    return [visible[i] for i in logical]
