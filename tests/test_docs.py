"""The docs describe the code that exists: ARCHITECTURE.md's module table names every module."""
from __future__ import annotations

import re

from tests.mpi_helpers import ROOT


def test_architecture_table_matches_the_modules_on_disk():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", text, flags=re.M))
    on_disk = {str(p.relative_to(ROOT)) for pkg in ("disdl_mpi", "data_prep", "bench")
               for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"}
    assert listed == on_disk, (f"missing from the table: {sorted(on_disk - listed)}; "
                               f"no such module: {sorted(listed - on_disk)}")


def test_no_python_module_passes_400_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in ("disdl_mpi", "data_prep", "bench", "tests")
            for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_library_never_imports_the_benchmarks():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "disdl_mpi").rglob("*.py")
                 if re.search(r"^\s*(from|import) bench\b", p.read_text(), flags=re.M)]
    assert not offenders, offenders
