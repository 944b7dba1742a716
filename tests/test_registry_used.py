"""The registry decides everywhere: no .py file outside modules/draft/ compares or dispatches on kind names.

A script that needs something kind-specific asks the kind (modules/draft/kinds.py: data_script,
train_command, fused_features, vllm_method, tree_adapter, ...), so a new kind is one file and one line
in KINDS. What counts as deciding by name, for the names registered in KINDS:
  - a comparison with a kind name: `arch == "eagle3"`, `name != "eagle2"`, `"eagle3" in (a, b)`;
  - a membership test against a literal collection holding one: `arch in ("eagle2", "eagle3")`;
  - a dict literal keyed by kind names (a dispatch table): `{"eagle3": [...], "eagle2": [...]}`;
  - a `match` case on one.
Passing a name on (`--arch eagle2`, `draft_kinds.get("eagle2")`) is not deciding; tests/ name kinds to
check what the registry returns, so they are not scanned.
"""
import ast
from pathlib import Path

from modules.draft.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("modules/draft/", "tests/", ".venv", "build/")


def _kind_literals(node, names) -> list[str]:
    """Kind names written as string constants in node itself or a tuple/list/set literal of them."""
    if isinstance(node, ast.Constant) and node.value in names:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
    return []


def name_decisions(source: str, names) -> list[tuple[int, str]]:
    """(line, what) of every place the source decides by a kind name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [(node.lineno, f"compares with {n!r}") for n in _kind_literals(operand, names)]
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            found += [(node.lineno, f"dict keyed by kind name {k!r}") for k in keys]
        elif isinstance(node, ast.match_case):
            for sub in ast.walk(node.pattern):
                if isinstance(sub, ast.MatchValue):
                    found += [(node.pattern.lineno, f"match case {n!r}") for n in _kind_literals(sub.value, names)]
    return found


def scanned_files():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(SKIP) and "/." not in f"/{rel}":
            yield rel, path


def test_checker_finds_name_decisions_control():
    names = set(KINDS)
    bad = '''
if args.arch == "eagle3":
    pass
x = "eagle2" != kind.name
y = arch in ("eagle2", "other")
TRAINERS = {"eagle3": ["train/train_eagle_ttt.py"], "eagle2": ["train/train.py"]}
match arch:
    case "eagle2":
        pass
'''
    found = name_decisions(bad, names)
    assert [line for line, _ in found] == [2, 4, 5, 6, 6, 8], found
    ok = '''
kind = draft_kinds.get("eagle2")
cmd = ["train/train_eagle_ttt.py", "--arch", "eagle3"]
if kind.fused_features and arch == "something-else":
    pass
'''
    assert name_decisions(ok, names) == []


def test_no_kind_name_decisions_outside_modules_draft():
    files = dict(scanned_files())
    assert "demo.py" in files and "benchmark/bench_vllm.py" in files and "modules/draft/kinds.py" not in files
    names = set(KINDS)
    problems = [f"{rel}:{line}: {what}" for rel, path in files.items()
                for line, what in name_decisions(path.read_text(), names)]
    assert not problems, ("decided by kind name instead of asking the kind (modules/draft/kinds.py):\n"
                          + "\n".join(problems))
