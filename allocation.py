"""Split a row range over GPUs (or CPU processes) and run one generator per device group.

    python allocation.py --output-dir data_out/eagle2 --end 20000                 # all visible GPUs, 1 each
    python allocation.py --output-dir data_out/eagle2 --gpus 0,1 2,3 --end 20000  # 2 workers, each target on 2 GPUs
    python allocation.py --output-dir data_out/eagle2 --workers 2 --end 200       # no GPU: 2 CPU processes
    python allocation.py --output-dir D --num-shards 4 --shard-index 1            # node 1 of 4 takes its quarter
    python allocation.py --output-dir D --script generate_data_fused_features.py -- --max-length 1024

Each worker writes OUTPUT_DIR/part-<index:04d>/ for its slice (no gap, no overlap) and logs to
OUTPUT_DIR/logs/; the progress bar follows the rows the workers have done (their progress.json).
Rerunning the same command resumes every worker. Flags after `--` (and unknown flags) go to the
generator unchanged. GPU ids are indexes into the GPUs this process sees: with
CUDA_VISIBLE_DEVICES=4,5 already set, `--gpus 0 1` (and the default) run on physical GPUs 4 and 5.
A worker given several GPUs gets --spread-target (its target is spread over them), or with --engine vllm
one engine with tensor parallelism over them (--engine-tensor-parallel; more engine flags after `--`).
CPU workers split the cores: with --engine vllm each engine binds its threads to its own share
(VLLM_CPU_OMP_THREADS_BIND, unless already set).
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.data.generation_cli import GenerateSettings
from modules.paths import REPO_ROOT
from modules.settings import like, parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--workers 2). The row range, dataset and output folder are the
# generators' settings (GenerateSettings, modules/data/generation_cli.py), passed to every worker;
# any other generator flag goes after `--`.
@dataclass
class Settings:
    script: str = setting("generate_data.py", "generator script to run per worker (generate_data_fused_features.py "
                                              "for EAGLE-3)")
    output_dir: str = like(GenerateSettings, "output_dir")
    dataset: str = like(GenerateSettings, "dataset")
    split: str | None = like(GenerateSettings, "split")
    start: int = like(GenerateSettings, "start")
    end: int | None = like(GenerateSettings, "end")
    gpus: list[str] | None = setting(None, "GPU ids per worker, e.g. 0,1 2,3 (default: each visible GPU)", nargs="*")
    workers: int | None = setting(None, "CPU worker processes (machines without GPUs)")
    engine: str = like(GenerateSettings, "engine")  # vllm: one engine per GPU group, tensor parallel over it
    num_shards: int = setting(1, "nodes sharing the range")
    shard_index: int = setting(0, "this node's part (0-based)")
# ----------------------------------------------------------------------------- end of SETTINGS

POLL_SECONDS = 0.5  # how often the progress bar reads the workers' progress


def split_range(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous slices covering [start, end) with no gap or overlap, sizes differing by <= 1.
    Empty slices are dropped (more workers than rows)."""
    if end <= start:
        raise ValueError(f"empty row range: start={start} end={end}")
    n = end - start
    bounds = [start + (n * k) // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def parse_gpu_groups(groups: list[str] | None) -> list[list[int]]:
    """['0,1', '2,3'] -> [[0, 1], [2, 3]]; None -> one worker per visible GPU (logical indexes)."""
    if groups is None:
        import torch

        return [[i] for i in range(torch.cuda.device_count())]
    out = []
    for g in groups:
        try:
            out.append([int(x) for x in g.split(",") if x != ""])
        except ValueError:
            raise SystemExit(f"error: --gpus takes comma-separated GPU ids per worker, got '{g}'") from None
    return out


def engine_cores(cores: list[int], worker: int, threads: int) -> str:
    """The cores a CPU worker's vLLM engine binds its threads to: the worker's own `threads` cores.
    vLLM's automatic binding chooses per engine, not per machine: every engine takes the same cores (on
    2 cores with the hidden-states connector it reserves 2, finds too few and binds both), so two engine
    workers would run their OpenMP threads on the same cores, twice as many threads as cores."""
    mine = cores[worker * threads:(worker + 1) * threads] or cores[-threads:]
    return ",".join(str(c) for c in mine)


def worker_plan(args) -> list[dict]:
    """One dict per worker: index, rows, env (GPU ids or CPU threads), gpus (physical ids)."""
    from modules.placement import PlacementError, physical_gpus

    try:
        gpu_groups = [] if args.workers else [physical_gpus(g) for g in parse_gpu_groups(args.gpus)]
    except PlacementError as err:
        raise SystemExit(f"error: --gpus: {err}") from None
    n_workers = len(gpu_groups) or args.workers or 1
    node = split_range(args.start, args.end, args.num_shards)
    if args.shard_index >= len(node):
        raise SystemExit(f"error: --shard-index {args.shard_index} has no rows (range {args.start}-{args.end}, "
                         f"{args.num_shards} shards)")
    a, b = node[args.shard_index]
    cores = sorted(os.sched_getaffinity(0))
    threads = max(1, len(cores) // n_workers)
    plan = []
    for w, (lo, hi) in enumerate(split_range(a, b, n_workers)):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}  # workers
        if gpu_groups:                                                                         # are independent
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_groups[w])
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers: never touch a GPU
            if args.engine == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                env["VLLM_CPU_OMP_THREADS_BIND"] = engine_cores(cores, w, threads)
        plan.append({"index": args.shard_index * n_workers + w, "start": lo, "end": hi, "env": env,
                     "gpus": gpu_groups[w] if gpu_groups else None, "threads": None if gpu_groups else threads})
    return plan


def launch(worker: dict, args, extra: list[str]) -> subprocess.Popen:
    log_dir = Path(args.output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker["log"] = log_dir / f"worker-{worker['index']:04d}.log"
    cmd = [sys.executable, str(REPO_ROOT / args.script), "--start", str(worker["start"]), "--end", str(worker["end"]),
           "--index", str(worker["index"]), "--output-dir", args.output_dir, "--dataset", args.dataset,
           "--no-progress"]
    if args.split:
        cmd += ["--split", args.split]
    if worker["threads"]:
        cmd += ["--threads", str(worker["threads"]), "--device", "cpu"]
    if args.engine != "hf":
        cmd += ["--engine", args.engine]
    if worker["gpus"] and len(worker["gpus"]) > 1:  # the target over the group's GPUs
        cmd += ["--engine-tensor-parallel", str(len(worker["gpus"]))] if args.engine != "hf" else ["--spread-target"]
    cmd += extra
    worker["cmd"] = cmd
    log = open(worker["log"], "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker["env"], cwd=REPO_ROOT)


def rows_done(outdir: str, worker: dict) -> int:
    """Rows a worker has done (progress without talking to it): those its progress.json counts (shards
    on disk + rows computed in the window at work, modules/data/generation.py), at least those its
    whole shards cover."""
    from modules.data.generation import PROGRESS
    from modules.data.storage import SHARD_RE

    folder = Path(outdir) / f"part-{worker['index']:04d}"
    if not folder.is_dir():
        return 0
    in_shards = sum(int(m.group(2)) - int(m.group(1)) for p in folder.iterdir() if (m := SHARD_RE.match(p.name)))
    try:
        progress = json.loads((folder / PROGRESS).read_text())["rows_done"]
    except (OSError, ValueError, KeyError, TypeError):  # not written yet (or by an older generator)
        progress = 0
    return min(max(in_shards, progress), worker["end"] - worker["start"])


def parse_args(argv=None):
    """(settings, flags for the generator: unknown ones and those after `--`)."""
    args, extra = parse_settings(Settings, argv, description=__doc__.splitlines()[0], known_only=True)
    return args, [x for x in extra if x != "--"]


def complete_args(args) -> str | None:
    """Fill in args.end (the dataset's length) and args.workers (1 on a machine without GPUs);
    the error message when the script, the dataset or the range is bad, else None."""
    if not (REPO_ROOT / args.script).is_file():
        return f"generator script not found: {args.script}"
    if args.end is None:
        from modules.data.chat import DatasetError, count_rows

        try:
            args.end = count_rows(args.dataset, args.split)
        except DatasetError as err:
            return str(err)
    if args.end <= args.start or not 0 <= args.shard_index < args.num_shards:
        return (f"empty row range or bad shard index (start={args.start} end={args.end} "
                f"shard {args.shard_index} of {args.num_shards})")
    if args.workers is None and args.gpus is None:
        import torch

        if torch.cuda.device_count() == 0:
            args.workers = 1
    return None


def launch_all(plan, args, extra):
    for w in plan:
        w["proc"] = launch(w, args, extra)
        where = f"GPUs {w['gpus']}" if w["gpus"] else f"CPU, {w['threads']} threads"
        print(f"worker {w['index']}: rows {w['start']}-{w['end']} on {where}, log {w['log']}")


def wait_with_progress(plan, outdir):
    """Wait for every worker, with one progress bar over the rows their shards cover."""
    from tqdm.auto import tqdm

    total = sum(w["end"] - w["start"] for w in plan)
    bar = tqdm(total=total, unit="row", desc="all workers", dynamic_ncols=True)
    while any(w["proc"].poll() is None for w in plan):
        time.sleep(POLL_SECONDS)
        bar.n = sum(rows_done(outdir, w) for w in plan)
        bar.refresh()
    bar.n = sum(rows_done(outdir, w) for w in plan)
    bar.close()


def report(plan, outdir) -> int:
    """Print what failed (with its log's last line) or what was done; the exit code."""
    failed = [w for w in plan if w["proc"].returncode != 0]
    for w in failed:
        last = [line for line in Path(w["log"]).read_text(errors="replace").splitlines() if line.strip()][-1:]
        print(f"error: worker {w['index']} (rows {w['start']}-{w['end']}) failed with exit code "
              f"{w['proc'].returncode}; log: {w['log']}" + (f"; last line: {last[0]}" if last else ""),
              file=sys.stderr)
    if failed:
        print("rerun the same command to resume", file=sys.stderr)
        return 1
    print(f"done: {len(plan)} workers, rows {plan[0]['start']}-{plan[-1]['end']} in {outdir}/part-*")
    return 0


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    error = complete_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plan = worker_plan(args)
    launch_all(plan, args, extra)
    wait_with_progress(plan, args.output_dir)
    return report(plan, args.output_dir)

if __name__ == "__main__":
    sys.exit(main())
