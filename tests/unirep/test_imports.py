"""The core never depends on a backend: no module under unirep/ imports vision or molecular."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import unirep

FORBIDDEN = ("vision", "molecular")
ROOT = Path(unirep.__file__).resolve().parent


def backend_imports(path: Path) -> list[str]:
    """``file:line: module`` for every import of a backend (plain, from-, importlib and __import__ forms)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        else:
            continue
        bad += [f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    return bad


def test_scanner_catches_backend_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom vision.models import sit\nimport molecular.data as md\nfrom . import tokens\n"
        "import importlib\nm = importlib.import_module('vision')\nimport visionary\n"
    )
    found = backend_imports(probe)
    assert found == ["probe.py:2: vision.models", "probe.py:3: molecular.data", "probe.py:6: vision"]


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_backends(path):
    bad = backend_imports(path)
    assert not bad, "unirep/ must not import vision or molecular:\n" + "\n".join(bad)
