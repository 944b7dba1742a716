"""Every package's __init__.py lists its files: each .py file (and sub-package) of the folder is named in the
docstring, so a newcomer opening the folder finds what each file holds (docs/extending.md#package-layout)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unlisted(package: Path) -> list[str]:
    """The files and sub-packages of `package` its __init__.py docstring does not name."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    return sorted(name for name in names if name not in doc)


def test_checker_finds_an_unlisted_file_control(tmp_path):
    (tmp_path / "__init__.py").write_text('"""A package.\n\n    a.py   the first file\n    sub/   a sub-package\n"""\n')
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "__init__.py").write_text("")
    assert unlisted(tmp_path) == ["b.py", "other/"]


def test_every_init_lists_its_files():
    packages = sorted(p.parent for p in (ROOT / "modules").rglob("__init__.py"))
    assert ROOT / "modules" / "draft" in packages
    problems = [f"{p.relative_to(ROOT)}/__init__.py leaves out {', '.join(unlisted(p))}" for p in packages
                if unlisted(p)]
    assert not problems, "\n".join(problems)
