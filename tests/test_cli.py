"""The command line: help, inspect (presets and checkpoints), convert."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import camelid_main as main

import camelid


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "convert" in out


@pytest.mark.parametrize("cmd", ["inspect", "convert"])
def test_subcommand_help(capsys, cmd):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "usage: camelid " + cmd in capsys.readouterr().out


def test_inspect_405b_without_allocating(capsys):
    """Answers from the config alone: a 1.6 TB fp32 model is never materialised."""
    assert main(["inspect", "llama-3.1-405b"]) == 0
    out = capsys.readouterr().out
    assert "405,853,388,800" in out
    for word in ("embedding", "attention", "mlp", "FLOPs/token", "AdamW", "bf16"):
        assert word in out


def test_inspect_json(capsys):
    assert main(["inspect", "llama-3.2-1b", "--json", "--seq-len", "2048"]) == 0
    data = json.loads(capsys.readouterr().out)
    cfg = camelid.ModelConfig.from_preset("llama-3.2-1b")
    assert data["params"]["total"] == cfg.num_params()
    assert data["params"]["output"] == 0  # tied
    assert data["flops_per_token"]["training"] == cfg.flops_per_token(2048)
    assert data["memory_bytes"]["weights_bf16"] == 2 * cfg.num_params()


def test_inspect_forward(capsys):
    assert main(["inspect", "tiny", "--forward", "--batch", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["forward"]["logits_shape"] == [2, 128, 512]


def test_inspect_checkpoint(capsys, tiny_checkpoint):
    assert main(["inspect", str(tiny_checkpoint), "--forward"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint   1 file(s), float32" in out and "all finite" in out


def test_convert_to_bf16_and_shards(capsys, tiny_checkpoint, tmp_path):
    dst = tmp_path / "bf16"
    assert main(["convert", str(tiny_checkpoint), str(dst), "--dtype", "bfloat16",
                 "--max-shard-size", "40KB"]) == 0  # fmt: skip
    assert "converted" in capsys.readouterr().out
    assert (dst / "model.safetensors.index.json").exists()
    src = camelid.load(tiny_checkpoint)
    out = camelid.load(dst, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(src.named_parameters(), out.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_main_job_script_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "camelid.cli", "inspect", "llama-3.1-8b"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "8,030,261,248" in res.stdout


def test_python_m_camelid():
    res = subprocess.run([sys.executable, "-m", "camelid", "--version"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert res.stdout == f"camelid {camelid.__version__}\n"


def test_inspect_forward_bad_device_is_one_line(capsys):
    capsys.readouterr()
    assert main(["inspect", "tiny", "--forward", "--device", "nonsense"]) == 1
    err = capsys.readouterr().err
    assert err == "camelid: error: --device 'nonsense': not a device (try cpu, cuda)\n"


# ---------------------------------------------------------------- nothing imports the front door
def _imports_cli(source: str, package: str) -> bool:
    """Whether code in ``package`` imports camelid.cli (absolutely or relatively)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            names = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        if any(n == "camelid.cli" or n.startswith("camelid.cli.") for n in names):
            return True
    return False


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
        assert _imports_cli(code, "camelid.infer"), code
    others = [
        "import camelid",
        "from camelid.client import x",
        "from camelid import config",
        "from . import cli",
        "from .cli import x",
        "s = 'from camelid.cli import main'",
    ]
    for code in others:
        assert not _imports_cli(code, "camelid.infer"), code


def test_nothing_imports_the_cli():
    """cli/ is the front door: no room of the house, benchmark or test imports it (tests run
    the installed command instead)."""
    src = Path(camelid.__file__).parent
    repo = Path(__file__).resolve().parents[1]
    files = [
        f for f in src.rglob("*.py") if f.relative_to(src).parts[0] not in ("cli", "__main__.py")
    ]
    files += [*(repo / "tests").glob("*.py"), *(repo / "benchmarks").glob("*.py")]
    assert src / "infer" / "load.py" in files and len(files) > 30
    offenders = []
    for f in files:
        package = ".".join(f.relative_to(src.parent).parts[:-1]) if f.is_relative_to(src) else ""
        if _imports_cli(f.read_text(encoding="utf-8"), package):
            offenders.append(str(f))
    assert offenders == []
