"""LoRA fine-tuning with `camelid train` (`[lora] r = ...` on an `[init] model`): only the
adapters train and are checkpointed; exact resume; 2 processes equal 1; the run's adapter
loads in peft and its merged export gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import camelid_main, random_llama_dir, torchrun
from test_sft_train import _recipe, chat_data  # noqa: F401 (the fixture)
from test_train import step_losses

import camelid
from camelid.tokenizer import Tokenizer
from camelid.train.recipe import RecipeError, load_recipe
from camelid.train.trainer import train

LORA = {"r": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory, chat_data) -> Path:  # noqa: F811
    """A random tiny Llama with the chat data's tokenizer: the model LoRA adapts."""
    tok = Tokenizer.load(chat_data / "tok")
    path = random_llama_dir(tmp_path_factory.mktemp("lora-base") / "base",
                            vocab_size=tok.vocab_size)  # fmt: skip
    tok.save(path)
    return path


def _lora_recipe(root: Path, chat_data: Path, base: Path, **sections) -> Path:  # noqa: F811
    return _recipe(root, chat_data, init={"model": str(base)}, lora=LORA, **sections)


def test_lora_trains_adapters_only_and_exports_for_peft(tmp_path, chat_data, base, capsys):  # noqa: F811
    from torch.distributed.checkpoint import FileSystemReader

    recipe = load_recipe(_lora_recipe(tmp_path, chat_data, base, checkpoint={"interval": 4}))
    train(recipe, progress=False)
    run = tmp_path / "run"
    losses = step_losses(run)
    assert losses[8] < losses[1]
    # The checkpoints hold the adapters (and their optimizer state), not the frozen base.
    keys = FileSystemReader(str(run / "checkpoints" / "step-00000008")).read_metadata()
    model_keys = [k for k in keys.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    step = run / "checkpoints" / "step-00000008"
    assert camelid_main(["generate", str(step), "--prompt", "hi"]) == 1  # said plainly:
    assert "a LoRA run's checkpoint, which holds its adapters only" in capsys.readouterr().err
    # The exported adapter, applied by peft to transformers' base, equals the merged export.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hf_base = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf_base, run / "adapter").eval()
    merged = camelid.load(run / "hf").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        diff = (theirs(input_ids=ids).logits - merged(ids)).abs().max().item()
        moved = (camelid.load(base).eval()(ids) - merged(ids)).abs().max().item()
    assert diff < 1e-4 and moved > 1e-4, (diff, moved)


def test_lora_resume_is_exact_and_two_processes_equal_one(tmp_path, chat_data, base):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    recipe = load_recipe(_lora_recipe(one, chat_data, base, checkpoint={"interval": 4}))
    train(recipe, progress=False)
    straight = step_losses(one / "run")
    train(recipe, resume=str(one / "run" / "checkpoints" / "step-00000004"), progress=False)
    assert step_losses(one / "run") == straight  # the base re-read, the adapters restored

    path = _lora_recipe(two, chat_data, base, train={"batch_size": 2},
                        checkpoint={"interval": 0, "export_hf": False})  # fmt: skip
    torchrun("-m", "camelid.cli", "train", str(path))
    b = step_losses(two / "run")
    assert b.keys() == straight.keys()
    assert max(abs(straight[k] - b[k]) for k in b) < 1e-5, (straight, b)


def test_lora_recipe_errors(tmp_path, chat_data):  # noqa: F811
    with pytest.raises(RecipeError, match=r"set init\.model to the one to fine-tune"):
        load_recipe(_recipe(tmp_path, chat_data, lora={"r": 4}))
    with pytest.raises(RecipeError, match=r"lora\.targets: unknown 'qkv'"):
        load_recipe(_recipe(tmp_path, chat_data, init={"model": "x"},
                            lora={"r": 4, "targets": ["qkv"]}))  # fmt: skip
