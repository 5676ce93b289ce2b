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
    # GGUF is one file of weights and tokenizer (weights/gguf.py); the tokenizer is upstream
    "weights": GROUND | {"model", "tokenizer"},
    "infer": GROUND | {"model", "tokenizer", "weights"},
    "train": GROUND | {"model", "tokenizer", "data", "weights", "infer"},
    "eval": GROUND | {"model", "tokenizer", "data", "weights", "infer"},
    "serve": GROUND | {"model", "tokenizer", "weights", "infer"},
    # The whole pipeline, measured too (--chat scores with eval/): the top of the flow.
    "quickstart": GROUND | {"model", "tokenizer", "data", "weights", "infer", "train", "eval"},
    "__init__": GROUND | {"model", "tokenizer", "weights", "infer"},
    "__main__": {"cli"},
}


def imported(source: str, package: str) -> set[str]:
    """Every module (and ``module.name``) that code in ``package`` imports, relative imports
    resolved and lazy imports inside functions included."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).parts[:-1]) if path.is_relative_to(SRC) else ""


def imports_of(path: Path) -> set[str]:
    """The camelid rooms a file imports."""
    rooms = set()
    for name in imported(path.read_text(encoding="utf-8"), package_of(path)):
        parts = name.split(".")
        if (
            parts[0] == "camelid"
            and len(parts) > 1
            and (SRC / parts[1]).with_suffix(".py").exists() | (SRC / parts[1]).is_dir()
        ):
            rooms.add(parts[1])
        elif name == "camelid":
            rooms.add("__init__")
    return rooms


def imports_cli(source: str, package: str) -> bool:
    return any(
        n == "camelid.cli" or n.startswith("camelid.cli.") for n in imported(source, package)
    )


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


def test_the_import_check_is_real():
    imports = [
        "import camelid.cli",
        "from camelid.cli import main",
        "from camelid import cli",
        "from camelid.cli.args import note",
        "import camelid.cli.chat as c",
        "from .. import cli",
        "from ..cli import main",
        "def f():\n    import camelid.cli",
    ]
    for code in imports:
        assert imports_cli(code, "camelid.infer"), code
    others = [
        "import camelid",
        "from camelid.client import x",
        "from camelid import config",
        "from . import cli",
        "from .cli import x",
        "s = 'from camelid.cli import main'",
    ]
    for code in others:
        assert not imports_cli(code, "camelid.infer"), code
    assert imports_of(SRC / "train" / "trainer.py") >= {"model", "infer", "loss"}


def test_nothing_imports_the_cli():
    """cli/ is the front door: no room of the house, benchmark or test imports it (tests run
    the installed command instead)."""
    repo = SRC.parents[1]
    files = [
        f for f in SRC.rglob("*.py") if f.relative_to(SRC).parts[0] not in ("cli", "__main__.py")
    ]
    files += [*(repo / "tests").glob("*.py"), *(repo / "benchmarks").glob("*.py")]
    assert SRC / "infer" / "load.py" in files and len(files) > 30
    offenders = [str(f) for f in files if imports_cli(f.read_text(encoding="utf-8"),
                                                      package_of(f))]  # fmt: skip
    assert offenders == []
