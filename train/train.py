"""Train an EAGLE-1/2 draft on data written by generate_data.py / allocation.py.

    python train/train.py                                   # embedded SmolLM2 on data_out/eagle2
    python train/train.py --data DIR1 DIR2 --model meta-llama/Llama-3.1-8B-Instruct --epochs 10
    torchrun --nproc_per_node 8 train/train.py ...          # DDP
    accelerate launch --multi_gpu --num_processes 8 train/train.py ...   # the same, through accelerate

Checkpoints go to OUTPUT_DIR/checkpoint-*; the final draft is exported to OUTPUT_DIR/draft in the
SGLang/vLLM layout (config.json + model.safetensors) and the official EAGLE one (pytorch_model.bin);
OUTPUT_DIR/run_config.json (every setting), summary.json, log_history.json and training_curves.png
describe the run.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.draft import kinds as draft_kinds
from modules.paths import DEFAULT_DATA_DIR, DEFAULT_TRAIN_DIR
from modules.settings import parse_settings, save_run_config, setting
from modules.training.settings import TrainingSettings, with_kind_defaults
from modules.training.setup import check_data_fits_target, exit_code, pick_attention, resume_checkpoint, split
from modules.training.setup import run_and_finish_distributed, training_arguments


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--output-dir DIR). The settings shared with train_eagle_ttt.py
# (--lr, --max-steps, --grad-accum, ...) are TrainingSettings in modules/training/settings.py.
@dataclass
class Settings(TrainingSettings):
    arch: str = setting("eagle2", "draft kind (modules/draft/kinds.py) whose train_script is this one: eagle2 "
                                  "(train_eagle_ttt.py trains every kind)", choices=draft_kinds.KINDS)
    data: list[str] = setting([str(DEFAULT_DATA_DIR)], "one or more data folders (or parents of part-XXXX/ folders)")
    output_dir: str = setting(str(DEFAULT_TRAIN_DIR), "checkpoints, the exported draft and the run's json files",
                              hf="output_dir")
    detach_cls: bool = setting(False, "BaldEagle recipe: detach the prediction in the CE term (it gives no gradient)",
                               hf="detach_cls_pred")
    dump_rank_weights: bool = setting(False, "DDP test hook: each rank saves its weights", action="store_true",
                                      hidden=True)
# ----------------------------------------------------------------------------- end of SETTINGS

def parse_args(argv=None) -> Settings:
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    kind = draft_kinds.get(args.arch)
    if kind.train_script != "train/train.py":  # EagleTrainer trains EAGLE-1/2 and the kinds derived from it
        print(f"error: --arch {args.arch} trains with {kind.train_script} (its kind's train_script), not "
              f"train/train.py", file=sys.stderr)
        raise SystemExit(2)
    return with_kind_defaults(args, kind)


def load_data(args):
    """(dataset, train split, eval split or None, target config, target display name)."""
    from modules.data.storage import EagleDataset
    from modules.target import model_display_name
    from modules.target_weights import target_config

    ds = EagleDataset(args.data, read_aux=False)
    display = model_display_name(args.model)
    cfg = target_config(args.model)
    check_data_fits_target(ds, cfg, display, args.allow_other_model, args.max_length)
    train_ds, eval_ds = split(ds, args.eval_fraction, args.seed, args.train_conversations)
    return ds, train_ds, eval_ds, cfg, display


def build_trainer(args, train_ds, eval_ds, display):
    """A fresh draft for the target (seeded) inside an EagleTrainer."""
    from transformers import set_seed

    from modules.data.collate import EagleCollator
    from modules.training.eagle_trainer import EagleTrainer

    set_seed(args.seed)  # the same initial draft for the same seed (DDP also broadcasts rank 0's)
    draft = draft_kinds.get(args.arch).build(args.model, bias=args.bias, attn_implementation=pick_attention(args.attn))
    draft.config.target_model = display
    return EagleTrainer(model=draft, args=training_arguments(args, eval_ds is not None), train_dataset=train_ds,
                        eval_dataset=eval_ds, data_collator=EagleCollator(max_length=args.max_length))


def dump_rank_weights(trainer, output_dir):
    """--dump-rank-weights: each rank's trainable weights, for the DDP test to compare."""
    from safetensors.torch import save_file

    save_file(trainer.draft_module().trainable_state_dict(with_embed=False),
              str(Path(output_dir) / f"rank{trainer.args.process_index}.safetensors"),
              metadata={"world_size": str(trainer.args.world_size), "global_step": str(trainer.state.global_step)})


def save_outputs(args, trainer, draft, result, metrics, t0):
    """Rank 0: the draft export (unless --no-export), summary.json, log_history.json, training_curves.png.
    draft: the whole trained draft (trainer.full_draft(): under --fsdp consolidated from the shards)."""
    from modules.training.curves import save_run_outputs

    out = Path(args.output_dir) / "draft"
    if not args.no_export:
        draft_kinds.get(args.arch).save_trained(draft, out, target=args.model)
    summary = {"steps": result.global_step, "train_loss": round(result.training_loss, 5),
               "train_runtime_s": round(time.time() - t0, 1), **{k: round(v, 4) for k, v in metrics.items()},
               "draft": None if args.no_export else str(out)}
    save_run_outputs(args.output_dir, trainer.state.log_history, summary)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    try:
        ds, train_ds, eval_ds, cfg, display = load_data(args)
        trainer = build_trainer(args, train_ds, eval_ds, display)
        if trainer.is_world_process_zero():
            save_run_config(args, args.output_dir)
            n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            print(f"data: {len(train_ds)} train / {len(eval_ds) if eval_ds else 0} eval conversations from "
                  f"{len(ds.folders)} folder(s); target {display} (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}); "
                  f"trainable params {n_params:,}", flush=True)
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(args.resume, args.output_dir))
    except Exception as err:  # the scripts' one error ladder (modules/training/setup.py)
        code = exit_code(err, args)
        if code is None:
            raise
        return code

    metrics = trainer.evaluate() if eval_ds is not None else {}
    if args.dump_rank_weights:
        dump_rank_weights(trainer, args.output_dir)
    draft = trainer.full_draft()  # every rank: under --fsdp the weights are gathered from all of them
    if not trainer.is_world_process_zero():
        return 0
    try:
        save_outputs(args, trainer, draft, result, metrics, t0)
    except Exception as err:
        code = exit_code(err, args)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run_and_finish_distributed(main))
