"""The layers import in one direction only (../shared/design/ARCHITECTURE.md): the model families, the
backbones (nets/) and the solvers never import the layers built on them, so there is no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imagegen"
HIGHER = {"sample", "train", "cli", "serve", "report", "evaluate", "distributed", "checkpoint"}


def imported_modules(path: Path) -> set[str]:
    """The imagegen modules a file imports, as names relative to the package ("sample", "models.base")."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]          # the file's package, e.g. ("models",)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:                                                   # relative: from ..sample import x
                base = list(here[:len(here) - node.level + 1])
                names.add(".".join(base + ([node.module] if node.module else [])) or ".")
            elif node.module and node.module.startswith("imagegen."):
                names.add(node.module.removeprefix("imagegen."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("imagegen.") for a in node.names if a.name.startswith("imagegen.")}
    return names


@pytest.mark.parametrize("path", sorted([*(PACKAGE / "models").glob("*.py"), *(PACKAGE / "nets").glob("*.py"),
                                         PACKAGE / "solvers.py"]), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_families_backbones_and_solvers_never_import_a_higher_layer(path):
    higher = {m for m in imported_modules(path) if m.split(".")[0] in HIGHER}
    assert not higher, f"{path.name} imports {sorted(higher)}"


def test_the_solvers_paths_and_backbones_import_nothing_of_imagegen():
    # the solvers know the noise paths (paths.py), which know nothing of imagegen either
    assert imported_modules(PACKAGE / "solvers.py") == {"paths"} and imported_modules(PACKAGE / "paths.py") == set()
    for path in (PACKAGE / "nets").glob("*.py"):       # the backbones share pieces among themselves only
        assert {m for m in imported_modules(path) if m.split(".")[0] != "nets"} == set(), path.name
    assert "nets.layers" in imported_modules(PACKAGE / "nets" / "dit.py")


def test_the_checker_sees_relative_imports():
    assert "progress" in imported_modules(PACKAGE / "train.py") and "models" in imported_modules(PACKAGE / "train.py")
    assert "solvers" in imported_modules(PACKAGE / "models" / "ddpm.py")
