"""`camelid train` on a fine-tuning dataset (`prepare --format chat`): masked, packed rows; the
loss is the mean over exactly the learned tokens; exact resume; 2 processes equal 1."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from test_train import recipe_file, step_losses

from camelid.data import SFTLoader
from camelid.data.sft import SFTConfig, prepare_sft
from camelid.loss import IGNORE_INDEX, next_token_loss
from camelid.tokenizer import train_tokenizer
from camelid.train.recipe import load_recipe
from camelid.train.trainer import train
from camelid.weights.checkpoint import load as load_checkpoint


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """Arithmetic questions answered in one line, as multi-turn chats, prepared for SFT."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
                 {"role": "assistant", "content": str(a + b)}]  # fmt: skip
        if rng.random() < 0.3:
            turns = [{"role": "system", "content": "Answer with the number."}, *turns,
                     {"role": "user", "content": "And doubled?"},
                     {"role": "assistant", "content": str(2 * (a + b))}]  # fmt: skip
        rows.append({"messages": turns})
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in rows for m in r["messages"]]
    train_tokenizer(texts, vocab_size=400, num_special=16).save(root / "tok")
    cfg = SFTConfig(corpus=(str(root / "chats.jsonl"),), max_len=65, val_fraction=0.1)
    prepare_sft(cfg, root / "tok", root / "data", progress=False)
    return root


def _recipe(tmp_path: Path, chat_data: Path, **sections) -> Path:
    base = {"data": {"dir": str(chat_data / "data")},
            "train": {"steps": 8, "batch_size": 4, "seq_len": 64},
            "eval": {"interval": 0, "batches": 2, "sample_tokens": 0},
            "run": {"peak_tflops": 1.0}}  # fmt: skip
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return recipe_file(tmp_path, chat_data, **base)


def test_sft_loss_is_the_mean_over_the_learned_tokens(tmp_path, chat_data, capsys):
    train(load_recipe(_recipe(tmp_path, chat_data)), progress=False)
    run = tmp_path / "run"
    share = SFTLoader(chat_data / "data", "train", 4, 64, seed=0).padding_share
    assert f"(packing leaves {share:.1%} of them padding)" in capsys.readouterr().out
    losses = step_losses(run)
    assert losses[8] < losses[1]
    # Step 1's loss, recomputed: the start weights on the loader's first batch, masked mean.
    start = load_checkpoint(run / "checkpoints" / "step-00000000").eval()
    x, y, pos, doc = next(SFTLoader(chat_data / "data", "train", 4, 64, seed=0))
    learned = int((y != IGNORE_INDEX).sum())
    assert 0 < learned < y.numel() // 4  # only the answers and their end-of-turn tokens
    with torch.no_grad():
        expected = float(next_token_loss(start, x, y, "mean", pos, doc))
    assert losses[1] == pytest.approx(expected, abs=1e-5)
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and r["val_loss"] for r in evals)


def test_sft_resume_is_exact_and_two_processes_equal_one(tmp_path, chat_data):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    recipe = load_recipe(_recipe(one, chat_data, checkpoint={"interval": 4}))
    train(recipe, progress=False)
    straight = step_losses(one / "run")
    train(recipe, resume=str(one / "run" / "checkpoints" / "step-00000004"), progress=False)
    assert step_losses(one / "run") == straight  # steps 5..8 again, bit for bit

    path = _recipe(two, chat_data, train={"batch_size": 2}, checkpoint={"interval": 0})
    torchrun("-m", "camelid.cli", "train", str(path))
    b = step_losses(two / "run")
    assert b.keys() == straight.keys()
    assert max(abs(straight[k] - b[k]) for k in b) < 1e-5, (straight, b)


def test_sample_as_a_chat_turn(tmp_path, chat_data, monkeypatch):
    """`eval.sample_chat`: the sample prompt goes to the engine as a user turn of the chat
    template with the generation prompt (what a chat model answers), not as plain text."""
    from camelid.infer import Engine
    from camelid.tokenizer import Tokenizer

    seen = []
    generate = Engine.generate

    def spy(self, prompt, *args, **kwargs):
        seen.append(prompt)
        return generate(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    recipe = _recipe(tmp_path, chat_data, train={"steps": 2},
                     eval={"sample_chat": True, "sample_prompt": "What is 2 plus 3?",
                           "sample_tokens": 3})  # fmt: skip
    summary = train(load_recipe(recipe), progress=False)
    tok = Tokenizer.load(chat_data / "tok")
    want = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                   add_generation_prompt=True)  # fmt: skip
    assert seen == [want]
    assert summary.sample is not None
