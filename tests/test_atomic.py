"""Write-then-rename: one helper (rlef_hpc.atomic), one temporary-name scheme, used by every
writer in the package, the tools and the benchmarks."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from rlef_hpc import atomic

ROOT = Path(__file__).parent.parent


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.jsonl"
    atomic.write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed half-way")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_the_temporary_is_beside_the_file_hidden_and_per_process_unless_shared(tmp_path):
    path = tmp_path / "iter_0000004"
    assert atomic.temporary(path) == tmp_path / f".tmp-iter_0000004.{os.getpid()}"
    assert atomic.temporary(path, shared=True) == tmp_path / ".tmp-iter_0000004"


def test_a_directory_replaces_a_directory(tmp_path):
    target = tmp_path / "best"
    for content in ("first", "second"):
        with atomic.replacing(target, shared=True) as tmp:
            tmp.mkdir()
            (tmp / "model").write_text(content)
    assert (target / "model").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_sweep_removes_only_the_temporaries_it_is_asked_for(tmp_path):
    (tmp_path / ".tmp-iter_0000002").mkdir()
    (tmp_path / ".tmp-iter_0000002" / "x").write_text("x")
    (tmp_path / ".tmp-best").mkdir()
    (tmp_path / "iter_0000001").mkdir()
    assert [p.name for p in atomic.sweep(tmp_path, "iter_*")] == [".tmp-iter_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-best", "iter_0000001"]


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_writer_names_its_own_temporaries():
    """Every temporary name comes from rlef_hpc.atomic: no other module spells one (".tmp",
    "tmp-"), and none renames with os.rename (os.replace stays for moves between folders)."""
    sources = [
        p
        for folder in ("rlef_hpc", "tools", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != ROOT / "rlef_hpc" / "atomic.py"
    ]
    found = []
    for path in sources:
        for line, text in _code_strings(path):
            if ".tmp" in text or "tmp-" in text:
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "rename":
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: os.rename")
    assert not found, "\n".join(found)
