"""Shape rules of the code (issue 11), read from the source with ``ast``: no function longer
than 80 lines in the library and the deployment tool, generated code (``tb_reranker/_pb``)
aside; no class longer than 400 lines in either (issue 21 §2)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80
CHECKED = ("tb_reranker", "milvus_setup")
GENERATED_PARTS = frozenset({"_pb"})  # protobuf stubs, written by grpcio-tools
MAX_CLASS_LINES = 400
CLASS_CHECKED = CHECKED


def long_definitions(folder: Path, limit: int, kinds: tuple[type[ast.AST], ...]) -> list[str]:
    """``path:line name (lines)`` of every definition of ``kinds`` under ``folder`` longer than
    ``limit`` lines."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        if GENERATED_PARTS.intersection(path.relative_to(folder).parts):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, kinds):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(folder)}:{node.lineno} {node.name} ({lines})")
    return found


def long_functions(folder: Path, limit: int) -> list[str]:
    """``path:line name (lines)`` of every function under ``folder`` longer than ``limit``."""
    return long_definitions(folder, limit, (ast.FunctionDef, ast.AsyncFunctionDef))


def long_classes(folder: Path, limit: int) -> list[str]:
    """``path:line name (lines)`` of every class under ``folder`` longer than ``limit``."""
    return long_definitions(folder, limit, (ast.ClassDef,))


def test_the_rule_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == [
        f"m.py:5 long ({1 + MAX_FUNCTION_LINES})"
    ]
    assert long_functions(tmp_path, MAX_FUNCTION_LINES + 1) == []
    (tmp_path / "_pb").mkdir()  # generated code is not held to the rule
    (tmp_path / "_pb" / "stub.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == [
        f"m.py:5 long ({1 + MAX_FUNCTION_LINES})"
    ]


def test_no_long_functions() -> None:
    found = [
        f"{folder}/{f}"
        for folder in CHECKED
        for f in long_functions(ROOT / folder, MAX_FUNCTION_LINES)
    ]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}"


def test_the_rule_sees_a_long_class(tmp_path: Path) -> None:
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(10))
    (tmp_path / "m.py").write_text(f"class Small:\n    x = 1\n\n\nclass Big:\n{methods}")
    assert long_classes(tmp_path, 29) == ["m.py:5 Big (30)"]
    assert long_classes(tmp_path, 30) == []


def test_no_long_classes() -> None:
    """``VideoIndex`` was one 900-line class (connection, errors, model identity, three search
    strategies, paging), ``TokenBinder`` one of 690 (the CLIP's construction, the input checks,
    the fingerprints, video→text scoring); each is now a facade over one module per job."""
    found = [
        f"{folder}/{f}"
        for folder in CLASS_CHECKED
        for f in long_classes(ROOT / folder, MAX_CLASS_LINES)
    ]
    assert not found, f"classes over {MAX_CLASS_LINES} lines: {found}"
