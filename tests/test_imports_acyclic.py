"""The modules/ import graph has no cycles (every import counts, also those inside functions).

Layering rule (docs/extending.md#layers): a module imports only modules of lower layers; a leaf
utility (modules/io.py, modules/paths.py, modules/export/engines.py) imports nothing from modules/.
A function-level import is still a dependency: it only hides the cycle until the function runs.
The same holds between folders: the graph of modules/ subpackages (modules/decode -> modules/draft when any
file of decode/ imports any file of draft/) has no cycle either, so each pair of folders depends one way.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: modules/ modules it imports}, from every import statement in the file (ast.walk)."""
    files = {module_name(p, root): p for p in sorted((root / "modules").rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import modules.x.y` -> the longest known prefix
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def folder_of(module: str) -> str:
    """modules.draft.kinds -> modules.draft; a top-level module (modules.io) is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2])


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between the folders (subpackages) of modules/: every file-level edge but those within
    a folder."""
    folders = {}
    for name, edges in graph.items():
        src = folder_of(name)
        folders.setdefault(src, set()).update(folder_of(t) for t in edges if folder_of(t) != src)
    return folders


def test_checker_finds_a_cycle_control():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_checker_sees_function_level_imports_control(tmp_path):
    pkg = tmp_path / "modules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from modules.high import g\n    return g\n")
    (pkg / "high.py").write_text("from modules import low\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and {"modules.low", "modules.high"} <= set(cycle)


def test_checker_finds_a_folder_cycle_control(tmp_path):
    """No file cycle, but a loop between folders (a draft file imports decode/, a decode file imports another
    draft file inside a function): the folder graph must see it."""
    pkg = tmp_path / "modules"
    for folder in ("draft", "decode"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "draft" / "kinds.py").write_text("")
    (pkg / "draft" / "eagle.py").write_text("from modules.decode.tree_decoding import DraftAdapter\n")
    (pkg / "decode" / "tree_decoding.py").write_text("def make_adapter(d):\n    from modules.draft.kinds import get\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) is None
    cycle = find_cycle(folder_graph(graph))
    assert cycle is not None and {"modules.draft", "modules.decode"} <= set(cycle)


def test_modules_folders_import_one_way():
    folders = folder_graph(import_graph())
    assert "modules.draft" in folders["modules.decode"]  # the walk saw decode's imports of draft
    cycle = find_cycle(folders)
    assert cycle is None, "import loop between folders: " + " -> ".join(cycle)


def test_modules_import_graph_is_acyclic():
    graph = import_graph()
    assert "modules.draft.kinds" in graph and graph["modules.draft.eagle_draft"]  # the walk saw the files
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


LEAVES = ("modules.io", "modules.paths", "modules.export.engines")  # the bottom layer (docs/extending.md#layers)


def test_leaf_utilities_import_nothing_from_modules():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] == set(), f"{leaf} is a leaf of the layering but imports {sorted(graph[leaf])}"
