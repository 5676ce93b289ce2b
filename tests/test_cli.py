"""The command line: help, inspect (presets and checkpoints), convert."""

from __future__ import annotations

import json
import subprocess
import sys

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
