"""Worker of tests/test_training_ttt_ddp.py (DDP and FSDP): TTTTrainer for 3 optimizer
steps on 4 equal-length conversations, in five setups (EAGLE-3 with stored features, EAGLE-3 online,
EAGLE-1/2 arch, P-EAGLE, DFlash), and EagleTrainer (train/train.py's trainer) in another, "eagle2_plain"; each rank
writes its trained weights (under FSDP: rank 0 the consolidated ones) and how many all-reduces the
trainer made.

    python -m torch.distributed.run --nproc_per_node 2 tests/_worker_ttt_ddp.py OUT 1        # 2 ranks x batch 1
    python -m torch.distributed.run --nproc_per_node 2 tests/_worker_ttt_ddp.py OUT 1 fsdp   # the same, FSDP2
    python tests/_worker_ttt_ddp.py OUT 2                                                    # 1 process x batch 2

Both see the same global batch: 4 conversations per optimizer step (batch x ranks x 2 accumulation
micro-steps), i.e. the whole data set, so the sample order does not matter. Every conversation has
the same length, loss mask and (full draft vocabulary) number of valid positions per step, so the
per-micro-batch loss means average to the same gradient in both setups.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETUPS = ("eagle3", "eagle3_online", "eagle2", "peagle", "dflash")  # + the parallel drafters (block of 3)
ALL_SETUPS = SETUPS + ("eagle2_plain",)  # + EagleTrainer
STEPS, GRAD_ACCUM, N_ITEMS, LENGTH = 3, 2, 4, 16


def items(target):
    from modules.data.features import target_features
    from tests._helpers_eagle3 import AUX

    out = []
    for i in range(N_ITEMS):
        ids = (torch.arange(LENGTH) * (i + 1) + 7 * i) % 40 + 3
        mask = torch.zeros(LENGTH, dtype=torch.long)
        mask[3:] = 1
        last, aux = target_features(target, ids[None], None, AUX)
        out.append({"input_ids": ids, "loss_mask": mask, "row_id": i,
                    "hidden_states": last[0], "aux_hidden_states": aux[0]})
    return out


def make_draft(setup, target):
    """The seeded initial draft; EAGLE-3 with the full vocabulary as draft vocabulary, so every
    position is valid at every step."""
    from modules.draft.eagle3_draft import Eagle3Draft
    from modules.draft.eagle_draft import EagleDraft
    from tests._helpers_eagle3 import AUX, VOCAB

    torch.manual_seed(1)
    if setup.startswith("eagle2"):
        return EagleDraft.from_target(target)
    if setup in ("peagle", "dflash"):
        from modules.draft import kinds
        return kinds.get(setup).build(target, draft_ids=torch.arange(VOCAB), aux_layers=AUX, parallel_tokens=3)
    return Eagle3Draft.from_target(target, draft_ids=torch.arange(VOCAB), aux_layers=AUX)


def run(out_dir, batch_size, setup, fsdp=False, resume=False):
    """Train `setup` for STEPS steps (checkpoint at STEPS); resume=True: from that checkpoint to STEPS + 1."""
    from safetensors.torch import save_file

    from modules.data.collate import EagleCollator
    from modules.training.eagle_trainer import EagleTrainer, EagleTrainingArguments
    from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments
    from tests._helpers_eagle3 import tiny_target

    target = tiny_target()
    data = items(target)
    online = setup == "eagle3_online"
    if online:
        data = [{k: v for k, v in it.items() if "hidden" not in k} for it in data]
    draft = make_draft(setup, target)
    eagle3 = not setup.startswith("eagle2")
    plain = setup == "eagle2_plain"
    kw = dict(
        output_dir=str(Path(out_dir) / setup), max_steps=STEPS, learning_rate=1e-2, warmup_steps=0,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=GRAD_ACCUM,
        logging_steps=STEPS, report_to=[], save_strategy="steps", save_steps=STEPS,
        use_cpu=True, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False, noise_std=0.0, w_reg=0.0 if eagle3 else 1.0,
        w_cls=1.0 if eagle3 else 0.1, dataloader_num_workers=0, seed=0)
    if fsdp:
        kw.update(fsdp=True, fsdp_config={"version": 2})
    if resume:
        kw.update(max_steps=STEPS + 1, save_strategy="no")
    if plain:
        trainer = EagleTrainer(model=draft, args=EagleTrainingArguments(**kw), train_dataset=data,
                               data_collator=EagleCollator(64))
    else:
        trainer = TTTTrainer(model=draft, args=TTTTrainingArguments(**kw, ttt_steps=3), train_dataset=data,
                             data_collator=TTTCollator(64), target_head=target.lm_head.weight if eagle3 else None,
                             target=target if online else None, online=online)
    if fsdp:
        fsdp_on_cpu(trainer)
    args = trainer.args
    reduces = CountAllReduces()
    trainer.train(resume_from_checkpoint=str(Path(out_dir) / setup / f"checkpoint-{STEPS}") if resume else None)
    n_reduces = reduces.stop()
    whole = trainer.full_draft()  # under FSDP: gathered on every rank, a plain copy on rank 0
    if whole is None:
        return
    weights = {n: p.detach().contiguous() for n, p in whole.named_parameters() if p.requires_grad}
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    name = f"{setup}-resumed" if resume else setup
    save_file(weights, str(Path(out_dir) / f"{name}-rank{args.process_index}.safetensors"),
              metadata={"world_size": str(args.world_size), "global_step": str(trainer.state.global_step),
                        "all_reduce_calls": str(n_reduces), "fsdp": str(trainer.is_fsdp_enabled),
                        "wrapped": type(trainer.model_wrapped).__name__, "optimizer_numel": str(in_optimizer)})


def fsdp_on_cpu(trainer):
    """The CPU stand-in for FSDP: accelerate 1.15 turns its FSDP plugin on only for accelerator process
    groups (AcceleratorState: MULTI_GPU, MULTI_NPU, ...; MULTI_CPU is left out), so on CPU the Trainer
    would silently train under DDP. Switched on here by hand, after the Trainer built its accelerator and
    before train() wraps the model, exactly as the CUDA path has it then."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP  # both shared states
    trainer.is_fsdp_enabled = True


class CountAllReduces:
    """Counts torch.distributed.all_reduce calls (the trainer's metric / NaN reductions; DDP's
    gradient buckets are reduced in C++ and do not pass through here)."""

    def __init__(self):
        self.n, self.orig = 0, torch.distributed.all_reduce

        def counted(*a, **kw):
            self.n += 1
            return self.orig(*a, **kw)
        torch.distributed.all_reduce = counted

    def stop(self):
        torch.distributed.all_reduce = self.orig
        return self.n


if __name__ == "__main__":
    out, batch = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "ddp"
    for name in ALL_SETUPS:
        run(out, batch, name, fsdp=mode == "fsdp")
    if batch == 1:  # the distributed runs: a resume from the checkpoint (into the shards under FSDP)
        run(out, batch, "eagle3", fsdp=mode == "fsdp", resume=True)
    if torch.distributed.is_initialized():
        # Tear gloo down before the interpreter does: left to exit, its threads can abort the process
        # ("terminate called without an active exception", seen once in a clean-clone run).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
