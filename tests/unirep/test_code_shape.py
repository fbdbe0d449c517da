"""Issue 11's shape rules for the core: no function in ``unirep/`` over 80 lines (each part fits on a screen)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "unirep"


def test_no_core_function_over_80_lines():
    long = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(CORE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these into named parts: " + "; ".join(long)
