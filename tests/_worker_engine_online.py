"""Worker of tests/test_training_engine_online.py: train/train_eagle_ttt.py's main() as a user runs it under
torchrun, then each rank writes its draft's trained weights to OUT/rank<r>.safetensors (the script itself saves
rank 0's draft only), so that the test can see the ranks stay identical. The script's arguments come as a JSON
list in a file (torchrun's own parser would take flags such as --start for its --start-method).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_worker_engine_online.py OUT ARGS.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(out: str, argv: list[str]) -> int:
    import torch
    from safetensors.torch import save_file

    from train import train_eagle_ttt as script

    built = []
    build = script.build_trainer

    def keep(*args, **kwargs):  # the script's own build_trainer; the trainer is kept for the weights below
        trainer, covered = build(*args, **kwargs)
        built.append(trainer)
        return trainer, covered

    script.build_trainer = keep
    rc = script.main(argv)
    if rc == 0:
        trainer = built[0]
        weights = {n: p.detach().contiguous() for n, p in trainer.draft_module().named_parameters() if p.requires_grad}
        save_file(weights, str(Path(out) / f"rank{trainer.args.process_index}.safetensors"),
                  metadata={"world_size": str(trainer.args.world_size), "global_step": str(trainer.state.global_step)})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(Path(sys.argv[2]).read_text())))
