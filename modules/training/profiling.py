"""Where a training step's time goes: `--profile-steps N` profiles N optimizer steps with torch.profiler
and writes OUTPUT_DIR/profile.txt, the ops that took the time (device time first on CUDA, host time on CPU).

The profiler starts after PROFILE_WARMUP optimizer steps (the first steps pay for allocations, autotuning
and the data workers' start) and stops N steps later; training goes on unprofiled. Rank 0 writes the file.
"""
from pathlib import Path

import torch
from transformers import TrainerCallback

PROFILE_WARMUP = 2  # optimizer steps run before the profiled ones
PROFILE_FILE = "profile.txt"
PROFILE_ROWS = 15   # ops in the table


def profile_table(prof, device_type: str, rows: int = PROFILE_ROWS) -> str:
    """The profiler's op table sorted by the time that bounds the step: device time where a GPU ran."""
    sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


class ProfileCallback(TrainerCallback):
    """Profiles optimizer steps PROFILE_WARMUP + 1 .. PROFILE_WARMUP + steps of a Trainer run."""

    def __init__(self, steps: int, output_dir, device_type: str):
        self.steps, self.output_dir, self.device_type = steps, Path(output_dir), device_type
        self.prof = None
        self.table = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.prof is None and self.table is None and state.global_step >= PROFILE_WARMUP:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.first = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step - self.first >= self.steps:
            self._finish(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None:  # training ended inside the profiled window
            self._finish(state)

    def _finish(self, state):
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        steps = state.global_step - self.first
        self.table = (f"torch.profiler: optimizer steps {self.first + 1}-{state.global_step} ({steps} steps), "
                      f"sorted by self {'CUDA' if self.device_type == 'cuda' else 'CPU'} time\n"
                      + profile_table(self.prof, self.device_type))
        self.prof = None
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / PROFILE_FILE).write_text(self.table + "\n")
            print(self.table, flush=True)
