"""Docs cannot go stale silently: every path and anchor they name resolves.

Checked in README.md, docs/*.md, benchmark/README.md, tests/README.md and the docstrings of every .py file:
  - module paths: `modules/x/y.py`, `modules/x/y` (a file or folder), `modules/x/y.func`, dotted
    `modules.x.y[.func]`; a name after the module must be defined at its top level (or be a submodule);
  - repo paths: `train/...`, `benchmark/...`, `tests/...`, `docs/...` scripts and docs (.py, .md; not the
    files scripts write) and the scripts a command runs (`python generate_data.py`);
  - markdown anchors: `[text](#anchor)` and `file.md#anchor`, by GitHub's heading slugs.
"""
import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
        "benchmark/README.md", "tests/README.md"]

IDENT = r"[A-Za-z_]\w*"
MODULE_PATH_RE = re.compile(rf"(?<![\w/.-])modules((?:/{IDENT})+)(\.py)?((?:\.{IDENT})*)")
MODULE_DOTTED_RE = re.compile(rf"(?<![\w/.-])modules((?:\.{IDENT})+)")
REPO_PATH_RE = re.compile(r"(?<![\w/.-])((?:train|benchmark|tests|docs)/[\w./-]*\w\.(?:py|md))\b(#[\w-]+)?")
COMMAND_RE = re.compile(r"python3?\s+(?:-m\s+\S+\s+)?([\w./-]+\.py)\b")
# Names that stand for "yours" in examples (docs/extending.md's `modules/draft/my_draft.py` and its walkthrough's
# `modules/draft/toy_draft.py`, which tests/test_draft_toy_kind.py writes from the page; this docstring).
PLACEHOLDERS = {"x", "y", "my_draft", "toy_draft", "test_x"}
ANCHOR_RE = re.compile(r"\[[^\]]*\]\(([\w./-]*\.md)?#([^)\s]+)\)")


# ---------------------------------------------------------------------------- resolving one name

@cache
def top_level_names(path: Path) -> frozenset:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(names)


def module_problem(parts: list[str], root: Path = ROOT) -> str | None:
    """None if modules/<parts...> names a package, a module, or a top-level name of a module; else why not."""
    where = root / "modules"
    for i, part in enumerate(parts):
        if (where / part).is_dir():
            where = where / part
        elif (where / f"{part}.py").is_file():
            attrs = parts[i + 1:]
            if attrs and attrs[0] not in top_level_names(where / f"{part}.py"):
                return f"{(where / part).relative_to(root)}.py defines no {attrs[0]}"
            return None
        elif where.is_dir() and i > 0 and (where / "__init__.py").is_file() and part in top_level_names(
                where / "__init__.py"):
            return None
        else:
            return f"no {(where / part).relative_to(root)}[.py]"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # [text](url) -> text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset:
    found, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            s = slug(m.group(1))
            n = seen.get(s, 0)
            found.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return frozenset(found)


# ---------------------------------------------------------------------------- scanning a text

def problems_in(text: str, source: str, root: Path = ROOT) -> list[str]:
    """What `text` (a markdown file or a docstring, read from `source`) names that does not resolve."""
    text = re.sub(rf"\S*\b(?:{'|'.join(PLACEHOLDERS)})\b\S*", " ", text)
    out = []
    for m in MODULE_PATH_RE.finditer(text):
        parts = m.group(1).strip("/").split("/")
        attrs = [a for a in m.group(3).split(".") if a]
        if m.group(2) is None and attrs and attrs[0] == "md":
            continue
        if (problem := module_problem(parts + attrs, root)) is not None:
            out.append(f"{source}: {m.group(0)}: {problem}")
    for m in MODULE_DOTTED_RE.finditer(text):
        if (problem := module_problem([p for p in m.group(1).split(".") if p], root)) is not None:
            out.append(f"{source}: {m.group(0)}: {problem}")
    for m in REPO_PATH_RE.finditer(text):
        path = root / m.group(1)
        if not path.exists():
            out.append(f"{source}: {m.group(1)}: no such file")
        elif m.group(2) and path.suffix == ".md" and m.group(2)[1:] not in anchors(path):
            out.append(f"{source}: {m.group(0)}: no heading with that anchor")
    for m in COMMAND_RE.finditer(text):
        if not (root / m.group(1)).is_file():
            out.append(f"{source}: python {m.group(1)}: no such script")
    return out


def anchor_problems(md: Path, root: Path = ROOT) -> list[str]:
    out = []
    for m in ANCHOR_RE.finditer(md.read_text()):
        target = (md.parent / m.group(1)) if m.group(1) else md
        if not target.is_file():
            out.append(f"{md.relative_to(root)}: {m.group(0)}: no file {m.group(1)}")
        elif m.group(2) not in anchors(target):
            out.append(f"{md.relative_to(root)}: {m.group(0)}: no heading with anchor #{m.group(2)}")
    return out


def docstrings(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if (doc := ast.get_docstring(node, clean=False)) and node.body:
                yield node.body[0].lineno, doc


def python_files():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith((".venv", "build/")) and "/." not in f"/{rel}":
            yield path


# ---------------------------------------------------------------------------- tests

def test_slug_follows_github():
    assert slug("A draft kind: the registry") == "a-draft-kind-the-registry"
    assert slug("Why the repo is installed (`pip install -e .`), not put on `sys.path` by each script") == \
        "why-the-repo-is-installed-pip-install--e--not-put-on-syspath-by-each-script"
    assert slug("An engine convention: `modules/export/engines.py`") == "an-engine-convention-modulesexportenginespy"


def test_checker_reports_wrong_paths_control(tmp_path):
    text = ("see modules/draft/kinds.py, modules/draft/kinds.get, modules.draft.kinds.KINDS, modules/export/ and "
            "`python demo.py`; wrong: modules/draft_loading.load_draft, modules/draft/kinds.no_such_name, "
            "modules.generation.run_with_clear_errors, train/no_such_script.py, `python no_such.py`, "
            "docs/extending.md#no-such-heading")
    problems = problems_in(text, "control")
    assert len(problems) == 6, problems
    for wrong in ("draft_loading", "no_such_name", "modules.generation", "no_such_script", "no_such.py",
                  "no-such-heading"):
        assert any(wrong in p for p in problems), (wrong, problems)
    md = tmp_path / "x.md"
    md.write_text("# Title here\n\n[ok](#title-here) [bad](#title-there)\n```\n# not a heading\n```\n")
    assert [p.split(": ", 2)[1] for p in anchor_problems(md, tmp_path)] == ["[bad](#title-there)"]


def test_markdown_paths_and_anchors_resolve():
    problems = []
    for rel in DOCS:
        md = ROOT / rel
        problems += problems_in(md.read_text(), rel) + anchor_problems(md)
    assert not problems, "stale names in the docs:\n" + "\n".join(problems)


def test_docstring_paths_resolve():
    problems = []
    for path in python_files():
        for line, doc in docstrings(path):
            problems += problems_in(doc, f"{path.relative_to(ROOT)}:{line}")
    assert not problems, "stale names in docstrings:\n" + "\n".join(problems)
