"""CPU device-plumbing patches for vLLM's `speculators` 0.9.0 trainer (the peer of benchmark/bench_vs_speculators.py).

    python benchmark/peers/patch_speculators.py --site-packages auto      # the running interpreter's speculators
    python benchmark/peers/patch_speculators.py --check --site-packages auto   # report only, change nothing

speculators 0.9.0 assumes an accelerator: it moves the draft and every batch to `local_rank` (an integer: cuda:0),
synchronizes the accelerator in its step timer, autocasts on device type "cuda" when none is found (CUDA autocast
is then disabled, and its bf16 hidden states meet fp32 weights) and names "cuda:0" as the current device. Each patch
below replaces one exact snippet (found exactly once, or the script refuses with a one-line error and changes no
file) and touches only where tensors live or how the device is named, never the peer's math: the loss, the
optimizer, the schedule, the model and the data pipeline are speculators' own. A file already patched is left as it
is (the script can run twice).
"""
import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Patch:
    file: str   # relative to the speculators package folder
    old: str    # the exact snippet (found exactly once)
    new: str    # what replaces it
    why: str


PATCHES = [
    Patch("train/trainer.py",
          '        if not self.is_distributed:\n'
          '            self.model.to(self.local_rank)  # type: ignore[arg-type]\n',
          '        if not self.is_distributed:\n'
          '            self.model.to("cpu")  # CPU patch: was self.model.to(self.local_rank)\n',
          "the single-process draft lives on the CPU (local_rank 0 means cuda:0)"),
    Patch("train/trainer.py",
          '            timer.mark("pre_h2d")\n'
          '            gpu_batch = {\n'
          '                k: v.to(self.local_rank, non_blocking=True)\n',
          '            timer.mark("pre_h2d")\n'
          '            gpu_batch = {\n'
          '                k: v.to("cpu", non_blocking=True)  # CPU patch: was v.to(self.local_rank, ...)\n',
          "training batches stay on the CPU"),
    Patch("train/trainer.py",
          '                synchronize=_should_sync_recovery(i, num_batches - 1),\n'
          '            )\n'
          '            gpu_batch = {\n'
          '                k: v.to(self.local_rank, non_blocking=True)\n',
          '                synchronize=_should_sync_recovery(i, num_batches - 1),\n'
          '            )\n'
          '            gpu_batch = {\n'
          '                k: v.to("cpu", non_blocking=True)  # CPU patch: was v.to(self.local_rank, ...)\n',
          "validation batches stay on the CPU"),
    Patch("train/trainer.py",
          '        if self.enabled:\n'
          '            torch.accelerator.synchronize()\n',
          '        if self.enabled:\n'
          '            if torch.accelerator.is_available():  # CPU patch: guard\n'
          '                torch.accelerator.synchronize()\n',
          "the step timer's mark(): no accelerator to synchronize on a CPU"),
    Patch("train/trainer.py",
          '            return None\n'
          '        torch.accelerator.synchronize()\n'
          '        return time.perf_counter()\n',
          '            return None\n'
          '        if torch.accelerator.is_available():  # CPU patch: guard\n'
          '            torch.accelerator.synchronize()\n'
          '        return time.perf_counter()\n',
          "the step timer's now(): the same guard"),
    Patch("train/trainer.py",
          '        self.device_type = acc.type if acc is not None else "cuda"\n',
          '        self.device_type = acc.type if acc is not None else "cpu"  # CPU patch: was "cuda"\n',
          'autocast on the device that runs (CPU bf16 autocast, as it autocasts bf16 on a GPU); "cuda" disables '
          "autocast here and the bf16 hidden states then meet fp32 weights"),
    Patch("utils/util.py",
          '    if acc is None:\n'
          '        return "cuda:0"\n',
          '    if acc is None:\n'
          '        return "cpu"  # CPU patch: was "cuda:0"\n',
          "get_current_device() (checkpoint loading) names the CPU when there is no accelerator"),
]


class PatchError(RuntimeError):
    pass


def package_dir(site_packages: str) -> Path:
    """The speculators package folder: SITE/speculators, or with 'auto' the one this interpreter imports."""
    if site_packages == "auto":
        spec = importlib.util.find_spec("speculators")
        if spec is None or not spec.submodule_search_locations:
            raise PatchError(f"speculators is not installed for {sys.executable}")
        return Path(list(spec.submodule_search_locations)[0])
    path = Path(site_packages) / "speculators"
    if not path.is_dir():
        raise PatchError(f"{path}: no speculators package there")
    return path


def plan(pkg: Path, patches=PATCHES):
    """{file: new text} for the files that change, and the patches already applied. Raises PatchError (changing
    nothing) when a snippet is not found exactly once, neither patched nor unpatched."""
    texts, applied = {}, []
    for p in patches:
        path = pkg / p.file
        if not path.is_file():
            raise PatchError(f"{path}: missing (is this speculators 0.9.0?)")
        text = texts.get(p.file)
        if text is None:
            text = path.read_text()
        n_old, n_new = text.count(p.old), text.count(p.new)
        if n_old == 0 and n_new == 1:
            applied.append(p)
            texts.setdefault(p.file, text)
            continue
        if n_old != 1:
            first = p.old.strip().splitlines()[-1].strip()
            raise PatchError(f"{p.file}: expected the line {first!r} (in its context) exactly once, found it "
                             f"{n_old} times: not speculators 0.9.0, or changed; nothing was patched")
        texts[p.file] = text.replace(p.old, p.new)
    return texts, applied


def apply(pkg: Path, patches=PATCHES, check=False):
    """Patch the package (all or nothing). Returns (patches applied now, patches found already applied)."""
    texts, applied = plan(pkg, patches)
    todo = [p for p in patches if p not in applied]
    if not check:
        for file, text in texts.items():
            path = pkg / file
            if path.read_text() != text:
                path.write_text(text)
    return todo, applied


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site-packages", default="auto",
                    help="folder holding the speculators package; 'auto' = the one this interpreter imports")
    ap.add_argument("--check", action="store_true", help="report what would change, change nothing")
    args = ap.parse_args(argv)
    try:
        pkg = package_dir(args.site_packages)
        todo, applied = apply(pkg, check=args.check)
    except PatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    verb = "would patch" if args.check else "patched"
    for p in todo:
        print(f"{verb} {p.file}: {p.old.strip().splitlines()[-1].strip()}  ({p.why})")
    for p in applied:
        print(f"already patched {p.file}: {p.new.strip().splitlines()[-1].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
