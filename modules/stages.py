"""Run a pipeline stage (a plain script) as a child process, once: a stage that finished with the same
command line is skipped, so a rerun after Ctrl-C or a crash picks up where it stopped. Used by demo.py
and benchmark/bench_learning_curve.py."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from modules.paths import REPO_ROOT


def run_stage(name: str, cmd: list[str], done_dir: Path) -> float:
    """Run `cmd` (from the repo root) unless done_dir/<name>.json says it finished with the same
    command; returns its seconds. Exits with a clear message when it fails; Ctrl-C in the child
    raises KeyboardInterrupt here."""
    marker = Path(done_dir) / f"{name}.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("cmd") == cmd:
            print(f"== {name}: done earlier in {done['seconds']:.0f} s (delete {marker} to redo)")
            return done["seconds"]
    print(f"\n== {name}: {shlex.join(cmd)}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    seconds = time.time() - start
    if proc.returncode != 0:
        if proc.returncode in (-signal.SIGINT, 130):
            raise KeyboardInterrupt
        sys.exit(f"error: stage '{name}' failed with exit code {proc.returncode} after {seconds:.0f} s; "
                 f"fix the cause and rerun: finished stages are skipped and this one resumes")
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cmd": cmd, "seconds": seconds}))
    os.replace(tmp, marker)
    print(f"== {name}: {seconds:.0f} s", flush=True)
    return seconds
