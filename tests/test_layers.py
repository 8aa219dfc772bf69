"""The layers point one way: modeling/ <- sae/ <- steering/ <- server/, with data/ (corpora) beside
sae/ on modeling/ (and the eval harness beside the runtime).

Every import in every module, the ones inside functions included, is read from the source with
``ast``, so a lazy import cannot hide a dependency that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"modeling": "saesteer.modeling", "data": "saesteer.data", "sae": "saesteer.sae",
            "steering": "saesteer.steering", "server": "saesteer.server"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return out


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _offenders(folder: str, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    bad = {}
    for path in modules(folder):
        name = _module_name(path)
        if name.startswith(skip):
            continue
        hits = sorted(i for i in imports_of(path) if i.startswith(forbidden))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    src = ROOT / "steering" / "eval" / "interventions.py"
    found = imports_of(src)
    assert "saesteer.steering.hooks" in found  # `from ..hooks import Steerer`
    assert "saesteer.steering.eval.concepts" in found  # `from .concepts import ...`
    assert "saesteer.modeling.lm" in imports_of(ROOT / "server" / "api.py")  # imported inside setup()


@pytest.mark.parametrize(
    "folder,forbidden,skip",
    [
        ("modeling", ("saesteer.sae", "saesteer.data", "saesteer.steering", "saesteer.server", "saesteer.cli"), ()),
        ("data", ("saesteer.sae", "saesteer.steering", "saesteer.server", "saesteer.cli"), ()),
        ("sae", ("saesteer.data", "saesteer.steering", "saesteer.server", "saesteer.cli"), ()),
        ("steering", ("saesteer.server", "saesteer.cli"), ()),
        ("steering", ("saesteer.steering.eval",), ("saesteer.steering.eval",)),  # the runtime skips the harness
    ],
)
def test_no_import_points_up(folder, forbidden, skip):
    assert _offenders(folder, forbidden, skip) == {}
