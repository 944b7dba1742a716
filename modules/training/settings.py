"""Settings of the training scripts, each defined once (TRL style: a dataclass per script).

A script's settings are the fields of a dataclass at its top; everything else is derived from them:
the command-line flag (field `max_steps` -> `--max-steps`), its type (from the annotation), its
`--help` text, the value handed to the HF TrainingArguments (`hf=` names that field) and the
run_config.json a run writes. The settings both training scripts share are `TrainingSettings` below;
a script's dataclass subclasses it and adds its own:

    @dataclass
    class Settings(TrainingSettings):
        ttt_steps: int = setting(7, "unrolled draft steps (official EAGLE-3: 7)", hf="ttt_steps")

    args = parse_settings(Settings, argv)      # args.ttt_steps, args.lr, ...; `--ttt-steps 3` on the command line

Annotations map to flags: int / float / str, `X | None` (default None), bool (`--x` / `--no-x`, or
`action="store_true"` for a plain switch), list[X] (one or more values; `nargs=3` for exactly three).
"""
import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path


def setting(default, help, *, hf=None, choices=None, nargs=None, metavar=None, action=None, group=None,
            hidden=False):
    """One setting: its default, its help text (shown by --help) and how it becomes a flag.

    hf: the TrainingArguments field that receives the value unchanged (modules/training/setup.py).
    group: --help section. hidden: a flag for tests, left out of --help."""
    meta = {"help": help, "hf": hf, "choices": choices, "nargs": nargs, "metavar": metavar, "action": action,
            "group": group, "hidden": hidden}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(annotation):
    """(element type, takes several values) of an annotation: int | None -> (int, False), list[str] -> (str, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def settings_parser(cls, description=None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the settings dataclass `cls`."""
    parser = argparse.ArgumentParser(description=description)
    groups = {}
    hints = typing.get_type_hints(cls)
    own = list(vars(cls).get("__annotations__", {}))  # the script's own settings first, then the shared ones
    for f in sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own)):
        m, default = f.metadata, default_of(f)
        kind, several = _value_type(hints[f.name])
        text = m["help"].replace("%", "%%")
        if kind is not bool and default is not None and default != []:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            text += f" (default: {str(shown).replace('%', '%%')})"
        kw = {"dest": f.name, "default": default, "help": argparse.SUPPRESS if m["hidden"] else text}
        if m["action"]:
            kw["action"] = m["action"]
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if several:
                kw["nargs"] = m["nargs"] or "+"
        for key in ("choices", "metavar"):
            if m[key] is not None:
                kw[key] = m[key]
        where = parser
        if m["group"]:
            where = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        where.add_argument(flag_name(f.name), **kw)
    return parser


def parse_settings(cls, argv=None, description=None):
    """The settings dataclass `cls` filled from the command line (None: sys.argv)."""
    return cls(**vars(settings_parser(cls, description).parse_args(argv)))


def with_kind_defaults(settings, kind):
    """The settings with w_reg / w_cls / noise_std left at None taken from the draft kind's loss_weights
    (modules/draft/kinds.py decides them: EAGLE-1/2 1.0 / 0.1 / 0.2, EAGLE-3 0 / 1 / 0)."""
    return dataclasses.replace(settings, **{k: v for k, v in kind.loss_weights.items() if getattr(settings, k) is None})


def hf_arguments(settings) -> dict:
    """{TrainingArguments field: value} of the settings passed on unchanged (those with `hf=`)."""
    return {f.metadata["hf"]: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.metadata.get("hf")}


def save_run_config(settings, output_dir) -> Path:
    """OUTPUT_DIR/run_config.json: every setting of the run (flag values included), written atomically."""
    from modules.data.storage import atomic_write_text

    path = Path(output_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(settings), indent=2))
    return path


def load_run_config(cls, path):
    """The settings a run saved (run_config.json) as a `cls` instance: rerun with exactly them."""
    return cls(**json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- shared settings
# Settings of both training scripts (train/train.py, train/train_eagle_ttt.py). A script that needs
# another default re-declares the field in its own dataclass.

@dataclass
class TrainingSettings:
    model: str | None = setting(None, "target: hub id, local folder or .gguf; None = embedded SmolLM2-135M-Instruct")
    epochs: float = setting(4, "passes over the training conversations", hf="num_train_epochs")
    max_steps: int = setting(-1, "optimizer steps; > 0 overrides --epochs", hf="max_steps")
    lr: float = setting(3e-4, "peak learning rate; small data: higher than the official 3e-5 (which used 68k "
                              "conversations)", hf="learning_rate")
    lr_schedule: str = setting("linear", "decay after warmup, from LR to LR * MIN_LR_RATIO: linear (ours) or cosine "
                                         "(SpecForge)", hf="lr_schedule", choices=["linear", "cosine"])
    min_lr_ratio: float = setting(0.1, "the learning rate at the last step, as a share of LR", hf="min_lr_ratio")
    warmup: float = setting(0.05, "warmup steps (>= 1) or fraction of all steps (< 1)", hf="warmup_steps")
    batch_size: int = setting(1, "conversations per device and micro-batch (padded on the right)",
                              hf="per_device_train_batch_size")
    grad_accum: int = setting(4, "micro-batches per optimizer step", hf="gradient_accumulation_steps")
    max_length: int = setting(2048, "tokens per conversation (longer ones are cut)")
    eval_fraction: float = setting(0.02, "conversations held out for eval (top-k accuracy, simulated tau)")
    train_conversations: int = setting(0, "train on only the first N conversations of the seeded split (the eval "
                                          "ones stay the same; benchmark/bench_learning_curve.py); 0 = all")
    sim_steps: int = setting(5, "chain length of the simulated acceptance length", hf="sim_steps")
    w_reg: float | None = setting(None, "SmoothL1 feature loss weight; None = the draft kind's (EAGLE-1/2: 1.0, "
                                        "EAGLE-3: 0)", hf="w_reg")
    w_cls: float | None = setting(None, "soft cross-entropy weight; None = the draft kind's (EAGLE-1/2: 0.1, "
                                        "EAGLE-3: 1)", hf="w_cls")
    noise_std: float | None = setting(None, "uniform noise on input features; None = the draft kind's (EAGLE-1/2: "
                                            "0.2, EAGLE-3: 0)", hf="noise_std")
    bias: bool = setting(False, "fc bias of the EAGLE-1/2 draft: vLLM 0.32 builds fc without one (drops it), so "
                                "none by default (modules/export/engines.py)")
    grad_clip: float = setting(0.5, "max gradient norm", hf="max_grad_norm")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA and on CPUs with bf16 units (~1.8x faster), "
                                     "else fp32", choices=["auto", "bf16", "fp32"])
    attn: str = setting("auto", "auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | eager | "
                                "flash_attention_2; TTT attention: eager = the reference ([heads, T, T] scores per "
                                "step), anything else = SDPA kernels, no T x T matrix (modules/draft/ttt_attention.py)")
    logging_steps: int = setting(10, "optimizer steps between log lines", hf="logging_steps")
    save_steps: int = setting(200, "optimizer steps between checkpoints", hf="save_steps")
    save_total_limit: int = setting(2, "checkpoints kept (older ones deleted); 0 = keep all")
    eval_steps: int | None = setting(None, "optimizer steps between evals; None = at the end of every epoch",
                                     hf="eval_steps")
    dataloader_workers: int | None = setting(None, "processes reading the shards per rank; None = 2 on GPU, 0 on "
                                                   "CPU (cores compute)")
    prefetch_factor: int = setting(2, "batches each worker prepares ahead (with workers > 0)")
    report_to: str = setting("none", "none | tensorboard | wandb", hf="report_to")
    seed: int = setting(0, "seed of the split, the initial draft and the data order", hf="seed")
    resume: str | None = setting(None, "checkpoint folder, or 'auto' = the last one in --output-dir")
    allow_other_model: bool = setting(False, "train even if the data manifest names another target model",
                                      action="store_true")
    no_export: bool = setting(False, "skip the export at the end", action="store_true")
