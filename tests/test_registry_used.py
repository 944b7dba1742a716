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

Capabilities come from the kind only (`kind.parallel`, `kind.anchored`, ...): no .py file outside tests/, not
even in modules/draft/, asks `hasattr` of a draft or an adapter (`hasattr(draft, "block_unroll")` would be a
second answer to the question `kind.anchored` answers).
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


def _names_a_drafter(node) -> bool:
    """node is a variable or attribute naming a draft or an adapter: draft, self.adapter, drafter, draft_model."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "draft" in name.lower() or "adapter" in name.lower()


def capability_probes(source: str) -> list[tuple[int, str]]:
    """(line, what) of every `hasattr(<a draft or an adapter>, ...)` in the source."""
    return [(node.lineno, f"hasattr({ast.unparse(node.args[0])}, ...)") for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
            and node.args and _names_a_drafter(node.args[0])]


def scanned_files(skip=SKIP):
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(skip) and "/." not in f"/{rel}":
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


def test_checker_finds_capability_probes_control():
    bad = '''
if hasattr(draft, "block_unroll"):
    pass
ok = hasattr(self.adapter, "propose_block") or hasattr(drafter, "x")
'''
    assert [line for line, _ in capability_probes(bad)] == [2, 4, 4]
    ok = '''
if kind.anchored or hasattr(target, "model_type") or hasattr(config, "get_text_config"):
    pass
'''
    assert capability_probes(ok) == []


def test_no_hasattr_on_drafts_or_adapters():
    files = dict(scanned_files(skip=SKIP[1:]))  # modules/draft/ too: the kind, not its draft, answers
    assert "modules/draft/kinds.py" in files and "modules/training/ttt_trainer.py" in files
    problems = [f"{rel}:{line}: {what}" for rel, path in files.items()
                for line, what in capability_probes(path.read_text())]
    assert not problems, ("asks the draft instead of its kind (kind.parallel, kind.anchored, ...):\n"
                          + "\n".join(problems))
