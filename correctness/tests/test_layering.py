"""The packages' layering, bench -> correctness -> impls: no module imports from a package above
its own (``impls`` imports neither ``correctness`` nor ``bench``; ``correctness`` does not import
``bench``), read from the source with ``ast`` so that a lazy import inside a function counts.
Test modules are exempt: they check a package with what sits above it (the oracle, the bench)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABOVE = {"impls": ("correctness", "bench"), "correctness": ("bench",)}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_module_imports_from_a_package_above_its_own(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if "tests" not in path.relative_to(ROOT).parts
        for name in sorted(imported_packages(path) & set(ABOVE[package]))
    ]
    assert not offenders, offenders
