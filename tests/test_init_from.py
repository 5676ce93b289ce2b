"""Training that starts from weights (`[init] model = ...`): a Hugging Face directory, a run, a
checkpoint, a GGUF file; the tokenizer check; what [model] may still set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from test_train import dataset, recipe_file, step_losses  # noqa: F401 (the fixture)

import camelid
from camelid.tokenizer import train_tokenizer
from camelid.train.recipe import RecipeError, load_recipe
from camelid.train.trainer import train
from camelid.weights.checkpoint import load as load_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory, dataset):  # noqa: F811
    """A briefly trained tiny model: its run and Hugging Face export."""
    root = tmp_path_factory.mktemp("base")
    train(load_recipe(recipe_file(root, dataset, train={"steps": 8},
                                  checkpoint={"interval": 0})), progress=False)  # fmt: skip
    return root / "run"


def _start_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights a run started from: its step-0 checkpoint (the guard's first roll-back point)."""
    return load_checkpoint(run / "checkpoints" / "step-00000000").state_dict()


@pytest.mark.parametrize("which", ["hf", "run", "checkpoint", "gguf"])
def test_training_starts_from_the_given_weights(tmp_path, dataset, base, which):  # noqa: F811
    if which == "gguf":  # llama.cpp's file of the same weights (f32: exact)
        from camelid.weights import gguf

        hf_dir = base / "hf"
        gguf.save(camelid.load(hf_dir), camelid.Tokenizer.load(hf_dir), tmp_path / "m.gguf",
                  "f32", check=False)  # fmt: skip
    source = {"hf": base / "hf", "run": base, "gguf": tmp_path / "m.gguf",
              "checkpoint": base / "checkpoints" / "step-00000008"}[which]  # fmt: skip
    recipe = load_recipe(recipe_file(tmp_path, dataset, init={"model": str(source)},
                                     train={"steps": 2}, checkpoint={"interval": 0}))  # fmt: skip
    train(recipe, progress=False)
    run = tmp_path / "run"
    expected = camelid.load(base / "hf").state_dict()
    got = _start_weights(run)
    assert got.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(got[key], t), key
    # Continued training starts where the base ended, far below a fresh model's loss.
    fresh = step_losses(base)
    assert step_losses(run)[1] < fresh[1] - 0.5
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "init" for e in events)


def test_init_needs_the_datas_tokenizer_and_keeps_its_model(tmp_path, dataset, base):  # noqa: F811
    other = tmp_path / "other-tok"
    shutil.copytree(base / "hf", other)
    train_tokenizer(["something else entirely " * 20] * 20, vocab_size=300,
                    num_special=16).save(other)  # fmt: skip
    recipe = load_recipe(recipe_file(tmp_path, dataset, init={"model": str(other)}))
    with pytest.raises(RecipeError, match="has another tokenizer than the one"):
        train(recipe, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(RecipeError, match=r"\[model\] may only set max_seq_len, not dim"):
        load_recipe(recipe_file(tmp_path, dataset, init={"model": str(base / "hf")},
                                model={"preset": "tiny", "dim": 128}))  # fmt: skip
    with pytest.raises(RecipeError, match=r"init.model: .*no such directory"):
        train(load_recipe(recipe_file(tmp_path, dataset, init={"model": str(tmp_path / "x")})),
              progress=False)  # fmt: skip


def test_two_processes_start_from_the_same_weights(tmp_path, dataset, base):  # noqa: F811
    """Under torchrun + FSDP2 each rank keeps its shards of the loaded weights: the step-0
    checkpoint (read in one process) is the base model exactly, and the losses are 1 process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    init = {"model": str(base / "hf")}
    settings = {"checkpoint": {"interval": 0, "export_hf": False}, "run": {"peak_tflops": 1.0}}
    train(load_recipe(recipe_file(one, dataset, init=init, train={"steps": 2, "batch_size": 4},
                                  **settings)), progress=False)  # fmt: skip
    recipe = recipe_file(two, dataset, init=init, train={"steps": 2, "batch_size": 2}, **settings)
    torchrun("-m", "camelid.cli", "train", str(recipe))
    expected = camelid.load(base / "hf").state_dict()
    got = _start_weights(two / "run")
    for key, t in expected.items():
        assert torch.equal(got[key], t), key
    a, b = step_losses(one / "run"), step_losses(two / "run")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5, (a, b)
