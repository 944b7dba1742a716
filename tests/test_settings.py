"""The one settings mechanism (modules/settings.py) every script uses: --config FILE (JSON or YAML, flags
override it), aliases, settings reused with `like`, and a generator run replayed from its run_config.json."""
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

import allocation
import generate_data
from modules.data import generation
from modules.data.generation_cli import FusedGenerateSettings, GenerateSettings
from modules.settings import like, parse_settings, setting, settings_parser
from tests._helpers_data import chat_rows, tiny_target_dir, write_jsonl


@dataclass
class Demo:
    output_dir: str = setting("out", "output folder", aliases=["--outdir", "--out"])
    steps: int = setting(10, "steps")
    lr: float = setting(1e-3, "learning rate")
    tags: list[str] = setting(["a"], "tags")
    fast: bool = setting(False, "a switch")


def test_config_file_replaces_defaults_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"steps": 20, "lr": 0.5, "tags": ["x", "y"], "fast": True}))
    assert parse_settings(Demo, ["--config", str(cfg)]) == Demo(steps=20, lr=0.5, tags=["x", "y"], fast=True)
    assert parse_settings(Demo, ["--config", str(cfg), "--steps", "3", "--no-fast"]) == Demo(
        steps=3, lr=0.5, tags=["x", "y"], fast=False)
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("steps: 7\n--output-dir: elsewhere\n")  # flag spellings are accepted as keys
    assert parse_settings(Demo, ["--steps", "8", "--config", str(yaml_cfg)]) == Demo(output_dir="elsewhere", steps=8)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(SystemExit, match=r"bad.json: unknown setting\(s\) stepz"):
        parse_settings(Demo, ["--config", str(bad)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1\n")
    with pytest.raises(SystemExit, match="broken.yaml"):
        parse_settings(Demo, ["--config", str(broken)])
    with pytest.raises(SystemExit, match="missing.json"):
        parse_settings(Demo, ["--config", str(tmp_path / "missing.json")])


def test_output_folder_aliases():
    for flag in ("--output-dir", "--outdir", "--out"):
        assert parse_settings(Demo, [flag, "d"]).output_dir == "d"
    help_text = " ".join(settings_parser(Demo).format_help().split())
    assert "--output-dir OUTPUT_DIR, --outdir OUTPUT_DIR, --out OUTPUT_DIR" in help_text


def test_like_reuses_default_help_and_flag():
    @dataclass
    class Other:
        steps: int = like(Demo, "steps")
        lr: float = like(Demo, "lr", default=0.1, group="training")

    fields = {f.name: f for f in dataclasses.fields(Other)}
    assert fields["steps"].metadata["help"] == "steps" and parse_settings(Other, []) == Other(steps=10, lr=0.1)
    assert fields["lr"].metadata["group"] == "training"


def test_generator_settings_are_shared():
    """allocation.py and train_eagle_ttt.py --online take the generators' fields (same help); the fused
    generator only adds fields; old flag spellings still parse."""
    gen = {f.name: f for f in dataclasses.fields(GenerateSettings)}
    fused = {f.name: f for f in dataclasses.fields(FusedGenerateSettings)}
    assert set(gen) < set(fused) and set(fused) - set(gen) == {"aux_layers", "regenerate", "server_url",
                                                               "server_model", "regenerate_only"}
    for f in dataclasses.fields(allocation.Settings):
        if f.name in gen:
            assert f.metadata["help"] == gen[f.name].metadata["help"], f.name
    old = generate_data.Settings  # the flags of before, under their old spellings
    s = parse_settings(old, ["--outdir", "o", "--dtype", "fp32", "--regen-batch-size", "3", "--gpu_index", "0"])
    assert (s.output_dir, s.target_dtype, s.reply_batch_size, s.gpu_index) == ("o", "fp32", 3, [0])


def test_generator_run_config_reruns_the_run(tmp_path, capsys):
    """generate_data.py writes run_config.json; `--config` of it (with another --output-dir) writes the same bytes."""
    model = tiny_target_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "rows.jsonl", chat_rows(5))
    threads = torch.get_num_threads()
    try:
        assert generate_data.main(["--model", model, "--dataset", data, "--output-dir", str(tmp_path / "a"),
                                   "--rows-per-shard", "2", "--max-length", "256", "--threads", "1",
                                   "--target-dtype", "fp32", "--store-dtype", "fp32", "--no-progress"]) == 0
        saved = json.loads((tmp_path / "a" / "run_config.json").read_text())
        assert saved["rows_per_shard"] == 2 and saved["store_dtype"] == "fp32" and saved["model"] == model
        assert generate_data.main(["--config", str(tmp_path / "a" / "run_config.json"),
                                   "--output-dir", str(tmp_path / "b")]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    shards = sorted(p.name for p in (tmp_path / "a").glob("shard-*.safetensors"))
    assert len(shards) == 3 and shards == sorted(p.name for p in (tmp_path / "b").glob("shard-*.safetensors"))
    for name in shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    progress = json.loads((tmp_path / "b" / generation.PROGRESS).read_text())
    assert progress == {"rows_done": 5, "rows_total": 5}


def test_progress_moves_with_rows_before_the_shard_is_written(tmp_path, monkeypatch, capsys):
    """One shard holds every row: progress.json counts rows as their features are computed, so
    allocation.py's bar moves before that shard lands (it sat at 0% in `make demo`)."""
    model = tiny_target_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "rows.jsonl", chat_rows(6))
    out = tmp_path / "out"
    seen = []
    write_shard = generation.write_shard

    def watching_write_shard(*args, **kw):
        seen.append(json.loads((out / generation.PROGRESS).read_text())["rows_done"])
        return write_shard(*args, **kw)

    monkeypatch.setattr(generation, "write_shard", watching_write_shard)
    monkeypatch.setattr(generation, "PROGRESS_SECONDS", 0.0)
    threads = torch.get_num_threads()
    try:
        assert generate_data.main(["--model", model, "--dataset", data, "--output-dir", str(out), "--max-length",
                                   "256", "--threads", "1", "--target-dtype", "fp32", "--batch-tokens", "1",
                                   "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert seen == [6]  # one shard; every row counted before it was written
    worker = {"index": 0, "start": 0, "end": 6}
    (tmp_path / "alloc" / "part-0000").mkdir(parents=True)
    assert allocation.rows_done(str(tmp_path / "alloc"), worker) == 0
    (tmp_path / "alloc" / "part-0000" / generation.PROGRESS).write_text(json.dumps({"rows_done": 4, "rows_total": 6}))
    assert allocation.rows_done(str(tmp_path / "alloc"), worker) == 4


def test_row_bar_stops_at_its_total_when_rows_are_skipped(tmp_path, monkeypatch, capsys):
    """20 rows, 7 of them unusable (no reply): the bar ends at 20 of 20 (it counted the computed rows twice once
    their shard was on disk: 33 of 20), and never goes back."""
    model = tiny_target_dir(tmp_path / "model")
    rows = chat_rows(20)
    for row in rows[:7]:
        row["conversations"] = row["conversations"][:1]  # a human turn only: skipped
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    shown = []

    class Bar:
        def __init__(self, total, **_):
            self.total, self.n = total, 0

        def refresh(self):
            shown.append(self.n)

        def set_postfix(self, **_):
            pass

        def close(self):
            pass

    monkeypatch.setattr(generation, "tqdm", Bar)
    threads = torch.get_num_threads()
    try:
        assert generate_data.main(["--model", model, "--dataset", data, "--output-dir", str(tmp_path / "out"),
                                   "--max-length", "256", "--threads", "1", "--target-dtype", "fp32"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert shown[-1] == 20 and max(shown) == 20 and shown == sorted(shown), shown


def test_trainer_run_config_reruns_the_run(tmp_path):
    """train/train_eagle_ttt.py's run_config.json fed back with --config (another --output-dir): the same draft.
    Separate processes, as a user reruns (the TTT script's initial draft comes from the process's RNG state)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests._helpers_eagle import REPO_ROOT, save_tiny_target, write_fake_data

    target = save_tiny_target(tmp_path / "target", "llama")
    write_fake_data(tmp_path / "data", target, model_name=str(tmp_path / "target"), n=4)
    first = ["--arch", "eagle2", "--model", str(tmp_path / "target"), "--data", str(tmp_path / "data"),
             "--output-dir", str(tmp_path / "a"), "--max-steps", "2", "--grad-accum", "1", "--eval-fraction", "0",
             "--lr", "1e-3", "--seed", "5", "--ttt-steps", "2", "--save-steps", "100", "--precision", "fp32"]
    saved = tmp_path / "a" / "run_config.json"
    for argv in (first, ["--config", str(saved), "--output-dir", str(tmp_path / "b")]):
        r = subprocess.run([sys.executable, "train/train_eagle_ttt.py", *argv], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "b" / "run_config.json").read_text())
    assert again == {**json.loads(saved.read_text()), "output_dir": str(tmp_path / "b")}
    a, b = (load_file(str(tmp_path / run / "draft" / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
