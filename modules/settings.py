"""Settings of every script, each defined once (TRL style: a dataclass next to what reads it).

A script's settings are the fields of a dataclass; everything else is derived from them: the
command-line flag (field `max_steps` -> `--max-steps`, plus any `aliases`), its type (from the
annotation), its `--help` text, the run_config.json a run writes and the `--config FILE` it reads:

    @dataclass
    class Settings:
        output_dir: str = setting("out", "where the results go", aliases=["--outdir", "--out"])
        steps: int = setting(100, "optimizer steps")

    args = parse_settings(Settings, argv)      # args.steps; `--steps 3` or `--config run.yaml` on the command line

Annotations map to flags: int / float / str, `X | None` (default None), bool (`--x` / `--no-x`, or
`action="store_true"` for a plain switch), list[X] (one or more values; `nargs=3` for exactly three).
`--config FILE` (JSON or YAML: {field or flag name: value}) replaces the defaults; flags given on the
command line override the file. A run's saved run_config.json is such a file: feeding it back reruns
the run. A new setting is one field in one dataclass; a script that shares another script's setting
takes it with `like(OtherSettings, "name")` (same default and help) instead of writing it again.
"""
import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path


def setting(default, help, *, aliases=(), hf=None, choices=None, nargs=None, metavar=None, action=None,
            group=None, hidden=False):
    """One setting: its default, its help text (shown by --help) and how it becomes a flag.

    aliases: other flag spellings (kept for old command lines, e.g. --outdir for --output-dir).
    hf: the TrainingArguments field that receives the value unchanged (modules/training/setup.py).
    group: --help section. hidden: a flag for tests, left out of --help."""
    meta = {"help": help, "aliases": tuple(aliases), "hf": hf, "choices": choices, "nargs": nargs,
            "metavar": metavar, "action": action, "group": group, "hidden": hidden}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def like(cls, name, default=dataclasses.MISSING, **changes):
    """The setting `name` of the settings dataclass `cls`, reused in another one: the same default, help
    and flag, except what `default` / `changes` (any keyword of `setting`) replace."""
    f = cls.__dataclass_fields__[name]
    meta = {**f.metadata, **changes}
    meta.setdefault("aliases", ())
    return setting(default_of(f) if default is dataclasses.MISSING else default,
                   **{k: meta[k] for k in ("help", "aliases", "hf", "choices", "nargs", "metavar", "action", "group",
                                           "hidden")})


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


def _shown(default):
    """A default as --help shows it: a folder inside the repo relative to it (no machine paths)."""
    from modules.paths import REPO_ROOT

    root = str(REPO_ROOT) + os.sep
    return default[len(root):] if isinstance(default, str) and default.startswith(root) else default


CONFIG_HELP = ("JSON or YAML file of settings ({setting: value}, e.g. a run's run_config.json); flags given on "
               "the command line override it")


def settings_parser(cls, description=None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the settings dataclass `cls`, and --config FILE."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    groups = {}
    hints = typing.get_type_hints(cls)
    own = list(vars(cls).get("__annotations__", {}))  # the script's own settings first, then the shared ones
    for f in sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own)):
        m, default = f.metadata, default_of(f)
        kind, several = _value_type(hints[f.name])
        text = m["help"].replace("%", "%%")
        if kind is not bool and default is not None and default != []:
            shown = " ".join(map(str, default)) if isinstance(default, list) else _shown(default)
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
        where.add_argument(flag_name(f.name), *m.get("aliases", ()), **kw)
    return parser


def read_config_file(path, cls) -> dict:
    """{field: value} of a JSON or YAML settings file; an unknown key is an error naming the file."""
    path = Path(path)
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    errors = (OSError, ValueError)
    if yaml_file:
        import yaml

        errors += (yaml.YAMLError,)
    try:
        text = path.read_text()
        values = (yaml.safe_load(text) or {}) if yaml_file else json.loads(text)
    except errors as err:
        raise SystemExit(f"error: --config {path}: {err}") from err
    if not isinstance(values, dict):
        raise SystemExit(f"error: --config {path}: expected a mapping of settings, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.lstrip("-").replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"error: --config {path}: unknown setting(s) {', '.join(unknown)} (see --help)")
    return values


def parse_settings(cls, argv=None, description=None, known_only=False):
    """The settings dataclass `cls` filled from the command line (None: sys.argv), after --config FILE.

    known_only: return (settings, the arguments no setting took) instead of failing on them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = settings_parser(cls, description)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    if config:
        parser.set_defaults(**read_config_file(config, cls))
    if known_only:
        ns, rest = parser.parse_known_args(argv)
    else:
        ns, rest = parser.parse_args(argv), None
    values = {k: v for k, v in vars(ns).items() if k != "config"}
    return (cls(**values), rest) if known_only else cls(**values)


def save_run_config(settings, output_dir) -> Path:
    """OUTPUT_DIR/run_config.json: every setting of the run (flag values included), written atomically;
    `--config OUTPUT_DIR/run_config.json` reruns the run."""
    from modules.io import atomic_write_text

    path = Path(output_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(settings), indent=2))
    return path
