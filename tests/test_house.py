"""The rules of the house (docs/development.md): dependencies point down, and transformers is a
test-time reference only — the core imports without it and the suite runs without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "camelid"
GROUND = {"errors", "io", "system", "config", "loss"}
# Each room and the rooms it may import (besides itself). The ground floor imports only the
# ground floor; model/ only config; serve/ and eval/ never train/; nothing imports cli/.
ALLOWED = {
    **{room: GROUND for room in GROUND},
    "model": {"config"},
    "tokenizer": GROUND,
    "data": GROUND | {"tokenizer"},
    "weights": GROUND | {"model"},
    "infer": GROUND | {"model", "tokenizer", "weights"},
    "train": GROUND | {"model", "tokenizer", "data", "weights", "infer"},
    "eval": GROUND | {"model", "tokenizer", "data", "weights", "infer"},
    "serve": GROUND | {"model", "tokenizer", "weights", "infer"},
    "quickstart": GROUND | {"model", "tokenizer", "data", "weights", "infer", "train"},
    "__init__": GROUND | {"model", "tokenizer", "weights", "infer"},
    "__main__": {"cli"},
}


def imports_of(path: Path) -> set[str]:
    """The camelid rooms a file imports, lazy imports inside functions included."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "camelid":
                rooms.add(parts[1] if len(parts) > 1 else "__init__")
    return rooms


def test_dependencies_point_down():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        room = path.relative_to(SRC).parts[0].removesuffix(".py")
        if room == "cli":
            continue  # the front door may import every room
        allowed = ALLOWED.get(room)
        assert allowed is not None, f"{path}: a new room; add it to ALLOWED and the docs"
        for other in imports_of(path) - {room} - allowed:
            bad.append(f"{path.relative_to(SRC)} imports camelid.{other}")
    assert not bad, "\n".join(bad)


BLOCK_HF = "import sys; sys.modules['transformers'] = None; "


def test_core_imports_without_transformers():
    modules = ["camelid", "camelid.train.trainer", "camelid.quickstart", "camelid.infer",
               "camelid.data", "camelid.weights", "camelid.loss"]  # fmt: skip
    code = BLOCK_HF + "; ".join(f"import {m}" for m in modules)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_suite_collects_without_transformers():
    """Without transformers every test module still loads; HF-based tests skip one by one."""
    code = BLOCK_HF + (
        "import pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider',"
        f" {str(Path(__file__).parent)!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error" not in res.stdout.splitlines()[-1], res.stdout[-2000:]
