"""The docs describe the code that exists: ARCHITECTURE.md's module table names every module."""

from __future__ import annotations

import ast
import re

from tests.mpi_helpers import ROOT


def test_architecture_table_matches_the_modules_on_disk():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", text, flags=re.M))
    on_disk = {
        str(p.relative_to(ROOT))
        for pkg in ("disdl_mpi", "data_prep", "bench")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__init__.py"
    }
    assert listed == on_disk, (
        f"missing from the table: {sorted(on_disk - listed)}; no such module: {sorted(listed - on_disk)}"
    )


def test_no_python_module_passes_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in ("disdl_mpi", "data_prep", "bench", "tests")
        for p in (ROOT / pkg).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_the_library_never_imports_the_benchmarks_nor_data_prep():
    """The same rule as pyproject.toml's import contract (which CI runs through `make lint`):
    only the job's entry point may call data_prep, to build a missing partition."""
    allowed = {"disdl_mpi/run.py": {"data_prep"}}
    offenders = []
    for p in (ROOT / "disdl_mpi").rglob("*.py"):
        rel = str(p.relative_to(ROOT))
        found = set(re.findall(r"^\s*(?:from|import) (bench|data_prep)\b", p.read_text(), flags=re.M))
        if found - allowed.get(rel, set()):
            offenders.append((rel, sorted(found)))
    assert not offenders, offenders


def test_no_function_passes_80_lines_outside_the_parser_builders():
    long = {}
    for pkg in ("disdl_mpi", "data_prep", "bench", "tests"):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                    n = node.end_lineno - node.lineno + 1
                    key = (str(p.relative_to(ROOT)), node.name)
                    if n > 80:
                        long[key] = n
    assert not long, long
