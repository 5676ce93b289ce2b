"""Every user-caused error ends in one clear message naming the culprit, exit 1, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import camelid_main as main
from safetensors.torch import load_file, save_file

import camelid
from camelid.errors import CamelidError


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.err


def expect_error(capsys, ckpt: Path, *needles: str) -> None:
    """Both the API and both CLI commands reject the checkpoint, naming every needle."""
    with pytest.raises(CamelidError) as err:
        camelid.load(ckpt)
    for needle in needles:
        assert needle in str(err.value)
    for argv in (["convert", str(ckpt), str(ckpt.parent / "out")], ["inspect", str(ckpt)]):
        code, msg = run_cli(capsys, *argv)
        assert code == 1, argv
        assert msg.startswith("camelid: error: ") and msg.count("\n") == 1, msg
        for needle in needles:
            assert needle in msg
    assert not (ckpt.parent / "out").exists()


def _edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(ckpt: Path, fn) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_directory(capsys, tmp_path):
    expect_error(capsys, tmp_path / "nowhere", "nowhere", "no such directory")


def test_file_instead_of_directory(capsys, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    expect_error(capsys, f, "weights.bin", "expected a checkpoint directory")


def test_missing_config(capsys, tiny_checkpoint):
    (tiny_checkpoint / "config.json").unlink()
    expect_error(capsys, tiny_checkpoint, "config.json", "not found")


def test_config_not_json(capsys, tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("{not json")
    expect_error(capsys, tiny_checkpoint, "config.json", "not valid JSON")


def test_unknown_model_type(capsys, tiny_checkpoint):
    _edit_config(tiny_checkpoint, model_type="mistral")
    expect_error(capsys, tiny_checkpoint, "config.json", "model_type 'mistral'")


def test_missing_config_keys(capsys, tiny_checkpoint):
    _edit_config(tiny_checkpoint, hidden_size=None, vocab_size=None)
    expect_error(capsys, tiny_checkpoint, "config.json", "hidden_size", "vocab_size")


def test_no_weights(capsys, tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").rename(tiny_checkpoint / "pytorch_model.bin")
    expect_error(capsys, tiny_checkpoint, "model.safetensors", "pytorch_model.bin")


def test_wrong_shape(capsys, tiny_checkpoint):
    def shrink(t):
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-1]

    _edit_tensors(tiny_checkpoint, shrink)
    expect_error(capsys, tiny_checkpoint, "model.layers.1.mlp.up_proj.weight", "shape (202, 96)")


def test_config_disagrees_with_tensors(capsys, tiny_checkpoint):
    _edit_config(tiny_checkpoint, intermediate_size=256)
    expect_error(capsys, tiny_checkpoint, "model.layers.0.mlp.gate_proj.weight", "expected (256")


def test_wrong_dtype(capsys, tiny_checkpoint):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)

    _edit_tensors(tiny_checkpoint, to_int)
    expect_error(capsys, tiny_checkpoint, "model.norm.weight", "dtype I32")


def test_missing_tensor(capsys, tiny_checkpoint):
    _edit_tensors(tiny_checkpoint, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    expect_error(capsys, tiny_checkpoint, "missing tensor model.layers.0.self_attn.k_proj.weight")


def test_unexpected_tensor(capsys, tiny_checkpoint):
    def add(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    _edit_tensors(tiny_checkpoint, add)
    expect_error(capsys, tiny_checkpoint, "unexpected tensor model.layers.0.self_attn.q_norm")


def test_truncated_safetensors(capsys, tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(capsys, tiny_checkpoint, "model.safetensors", "not a readable safetensors file")


def test_corrupt_safetensors(capsys, tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    expect_error(capsys, tiny_checkpoint, "model.safetensors", "not a readable safetensors file")


def test_index_names_missing_shard(capsys, tmp_path):
    from conftest import hf_model, save_hf

    ckpt = save_hf(hf_model(), tmp_path / "hf", max_shard_size="60KB")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(capsys, ckpt, "model.safetensors.index.json", shard.name)


def test_unknown_preset(capsys):
    code, msg = run_cli(capsys, "inspect", "llama-5-8b")
    assert code == 1
    assert "llama-5-8b" in msg and "llama-3.1-8b" in msg and "tiny" in msg


def test_bad_flag_values(capsys, tiny_checkpoint, tmp_path):
    code, msg = run_cli(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "o"),
                        "--max-shard-size", "lots")  # fmt: skip
    assert code == 1 and "'lots'" in msg


def test_console_script_has_no_traceback(tmp_path):
    """The installed entry point, run for real: one line on stderr, exit status 1."""
    res = subprocess.run(
        [sys.executable, "-m", "camelid.cli", "convert", str(tmp_path / "absent"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("camelid: error: ") and "Traceback" not in res.stderr


def test_shard_lacks_tensor_the_index_lists(capsys, tmp_path):
    from conftest import hf_model, save_hf

    ckpt = save_hf(hf_model(), tmp_path / "hf", max_shard_size="60KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    tensors.pop(name)
    save_file(tensors, shard, metadata={"format": "pt"})
    expect_error(capsys, ckpt, shard.name, f"lacks tensor {name}")
