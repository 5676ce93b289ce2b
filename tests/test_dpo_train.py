"""DPO in `camelid train` (`[dpo] data = ...` on an `[init] model`): the step's loss is
`dpo_loss` of the start weights' reference; the reference is computed once (LoRA: the base with
its adapters off), saved and verified on resume; exact resume; 2 processes equal 1; the rewards
rise on an easy preference set; bad input stops cleanly through the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import camelid_main, random_llama_dir, torchrun
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from test_recipes_and_resume import cli, failed_cleanly, snapshot
from test_train import write_recipe

import camelid
from camelid.model.lora import LoraConfig, apply_lora
from camelid.tokenizer import Tokenizer, train_tokenizer
from camelid.train import dpo
from camelid.train.distributed import World
from camelid.train.dpo_run import REFERENCE_FILE, VAL_REFERENCE_FILE, DPORun
from camelid.train.recipe import RecipeError, load_recipe
from camelid.train.trainer import train
from camelid.weights.checkpoint import load as load_checkpoint
from camelid.weights.digest import directory_digest

B, SEQ = 4, 64
LORA = {"r": 4, "alpha": 8.0}


def _pairs(rng: random.Random, n: int, rejected: str | None = None) -> list[dict]:
    """Arithmetic questions: chosen the right sum, rejected a wrong one (or ``rejected``)."""
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        wrong = str(a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
        out.append(
            {
                "prompt": f"What is {a} plus {b}?",
                "chosen": str(a + b),
                "rejected": rejected or wrong,
            }
        )
    return out


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """Preference files, a chat tokenizer trained on them and a tiny random Llama with it."""
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(0)
    _write(root / "prefs.jsonl", _pairs(rng, 48))
    _write(root / "val.jsonl", _pairs(rng, 12))
    _write(root / "easy.jsonl", _pairs(rng, 48, rejected="I do not know."))
    _write(root / "easy-val.jsonl", _pairs(rng, 12, rejected="I do not know."))
    texts = [
        f"{r['prompt']} {r['chosen']} {r['rejected']} I do not know." for r in _pairs(rng, 200)
    ]
    tok = train_tokenizer(texts, vocab_size=400, num_special=16)
    random_llama_dir(root / "base", vocab_size=tok.vocab_size)
    tok.save(root / "base")
    return root


def _recipe(root: Path, prefs: Path, **sections) -> Path:
    base = {
        "init": {"model": str(prefs / "base")},
        "dpo": {"data": str(prefs / "prefs.jsonl"), "beta": 0.1},
        "train": {"steps": 6, "batch_size": B, "seq_len": SEQ, "device": "cpu"},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"interval": 3, "keep": 5},
        "eval": {"interval": 0, "batches": 2, "sample_tokens": 0},
        "log": {"interval": 100},
        "run": {"out_dir": str(root / "run"), "peak_tflops": 1.0},
    }
    return write_recipe(root / "recipe.toml", base, **sections)


def _steps(run: Path) -> dict[int, dict]:
    """Step -> its last record (a resumed run appends)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            out[rec["step"]] = rec
    return out


def _read(prefs: Path, name: str = "prefs.jsonl") -> dpo.PreferenceSet:
    return dpo.read_preferences(prefs / name, Tokenizer.load(prefs / "base"), SEQ)


# ------------------------------------------------------------------------------ the loader
def test_pair_loader_resumes_exactly_and_splits_a_global_batch_over_ranks(prefs):
    data = _read(prefs)
    one = dpo.PairLoader(data, 2 * B, seed=3)
    ranks = [dpo.PairLoader(data, B, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(len(one) * 2 + 1):  # past an epoch's end: a new order
        whole = next(one).index.tolist()
        halves = [next(r).index.tolist() for r in ranks]
        assert sorted(whole) == sorted(halves[0] + halves[1])
    state = one.state_dict()
    expected = [next(one).index.tolist() for _ in range(4)]
    again = dpo.PairLoader(data, 2 * B, seed=3)
    again.load_state_dict(state)
    assert [next(again).index.tolist() for _ in range(4)] == expected
    with pytest.raises(camelid.errors.DataError, match="global batch was 8 pairs"):
        dpo.PairLoader(data, B, seed=3).load_state_dict(state)
    with pytest.raises(camelid.errors.DataError, match="fewer than one batch of 64 per rank"):
        dpo.PairLoader(data, 64)


# ----------------------------------------------------------------------- the loss, by hand
def test_first_steps_are_dpo_loss_of_the_start_weights(tmp_path, prefs):
    """Full DPO: step 1 (policy = reference) and step 2 (after one update) recomputed from the
    start weights, the step-1 checkpoint and the loader's pairs."""
    recipe = _recipe(
        tmp_path,
        prefs,
        train={"steps": 2},
        lora={"r": 0},
        checkpoint={"interval": 1, "export_hf": False},
    )
    train(load_recipe(recipe), progress=False)
    run = tmp_path / "run"
    steps = _steps(run)
    data = _read(prefs)
    start = camelid.load(prefs / "base").eval()
    ref = dpo.Reference.load(run / REFERENCE_FILE)
    by_hand = dpo.reference_logps(start, data, batch_size=B)
    torch.testing.assert_close(ref.logps, by_hand.logps, rtol=0, atol=1e-6)
    ref.verify(directory_digest(prefs / "base"), data.digest)  # of init.model and these pairs
    loader = dpo.PairLoader(data, B, seed=0)
    tokens = 0
    for step, policy in ((1, start), (2, load_checkpoint(run / "checkpoints" / "step-00000001"))):
        batch = next(loader)
        with torch.no_grad():
            logps = dpo.sequence_logps(policy.eval(), batch.input_ids, batch.completion_mask)
        r = by_hand.logps[batch.index]
        loss, metrics = dpo.dpo_loss(*logps.chunk(2), r[:, 0], r[:, 1], beta=0.1)
        rec = steps[step]
        assert rec["loss"] == pytest.approx(loss.item(), abs=1e-5), step
        for name in dpo.METRICS:
            assert rec[name] == pytest.approx(metrics[name].item(), abs=1e-5), (step, name)
        pairs = [data.pairs[i] for i in batch.index.tolist()]
        tokens += sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
        assert rec["tokens"] == tokens  # the pairs' tokens, padding excluded
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert steps[1]["rewards/margins"] == 0.0 and steps[2]["rewards/margins"] != 0.0


# ------------------------------------------------------------------------------ reference
def test_lora_reference_is_the_base_with_adapters_off(tmp_path, prefs):
    """The reference DPORun computes for a LoRA model is the base's, even when the adapters
    already change the model (as they do by any later step)."""
    recipe = load_recipe(_recipe(tmp_path, prefs, lora=LORA))
    base = camelid.load(prefs / "base").eval()
    model = apply_lora(camelid.load(prefs / "base"), LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)  # adapters that matter
    tok = Tokenizer.load(prefs / "base")
    run = DPORun(recipe, World(), tok, model.config, "w" * 64, lora=True)
    run.compute_reference(model, tmp_path, None, progress=False)
    data = _read(prefs)
    of_base = dpo.reference_logps(base, data, batch_size=B).logps
    torch.testing.assert_close(run.ref.logps, of_base, rtol=0, atol=1e-5)
    with_adapters = dpo.reference_logps(model, data, batch_size=B).logps
    assert (with_adapters - of_base).abs().max() > 1e-2
    assert dpo.Reference.load(tmp_path / REFERENCE_FILE).weights_digest == "w" * 64


def test_lora_dpo_resume_is_exact_and_two_processes_equal_one(tmp_path, prefs, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    val = {"val_data": str(prefs / "val.jsonl")}
    recipe = _recipe(one, prefs, lora=LORA, dpo=val, eval={"interval": 3})
    train(load_recipe(recipe), progress=False)
    run = one / "run"
    straight = _steps(run)
    assert set(straight) == set(range(1, 7))
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "hf").is_dir()
    refs = {name: (run / name).read_bytes() for name in (REFERENCE_FILE, VAL_REFERENCE_FILE)}
    mtimes = {name: (run / name).stat().st_mtime_ns for name in refs}
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and all(0 < e["val_loss"] < 1 for e in evals)
    assert all(e["val_pairs"] == 8 for e in evals)  # 2 batches of 4
    report = (run / "report.md").read_text()
    assert "## DPO" in report and (run / "rewards.png").is_file()

    # Resumed from step 3: the reference is read and verified, not recomputed or rewritten.
    train(load_recipe(recipe), resume=str(run / "checkpoints" / "step-00000003"), progress=False)
    again = _steps(run)
    for step in range(1, 7):
        for key in ("loss", *dpo.METRICS):
            assert again[step][key] == straight[step][key], (step, key)
    assert {n: (run / n).read_bytes() for n in refs} == refs
    assert {n: (run / n).stat().st_mtime_ns for n in refs} == mtimes

    # A reference changed by one ulp is refused before anything is written.
    path = run / REFERENCE_FILE
    with safe_open(str(path), "pt") as f:
        logps, meta = f.get_tensor("logps"), f.metadata()
    logps[0, 0] = torch.nextafter(logps[0, 0], torch.tensor(0.0))
    save_file({"logps": logps}, str(path), metadata=meta)
    before = snapshot(run)
    step3 = run / "checkpoints" / "step-00000003"
    line = failed_cleanly(*cli(capsys, "train", recipe, "--resume", step3)[::2])
    assert f"{path}: DPO reference log-probs do not match their checksum" in line
    assert snapshot(run) == before
    path.unlink()
    before = snapshot(run)
    line = failed_cleanly(*cli(capsys, "train", recipe, "--resume", step3)[::2])
    assert f"{path}: the run's DPO reference is missing" in line and "--fresh" in line
    assert snapshot(run) == before

    # Two processes (FSDP2), half the batch each: the same losses, rewards and reference.
    path = _recipe(
        two,
        prefs,
        lora=LORA,
        dpo=val,
        train={"batch_size": B // 2},
        eval={"interval": 3},
        checkpoint={"interval": 0, "export_hf": False},
    )
    torchrun("-m", "camelid.cli", "train", str(path))
    pair = _steps(two / "run")
    assert pair.keys() == straight.keys()
    for step in straight:
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            assert abs(pair[step][key] - straight[step][key]) < 1e-5, (step, key)
    for name, saved in refs.items():  # the sharded reference pass: each rank did half
        ours = dpo.Reference.load(two / "run" / name).logps
        torch.testing.assert_close(ours, load_safetensors(saved)["logps"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- learning
def test_rewards_rise_on_an_easy_preference_set(tmp_path, prefs):
    """Chosen: the answer; rejected: always "I do not know." LoRA DPO learns to prefer the
    answer within a few steps, on held-out questions too."""
    recipe = _recipe(
        tmp_path,
        prefs,
        lora=LORA,
        train={"steps": 10},
        dpo={"data": str(prefs / "easy.jsonl"), "val_data": str(prefs / "easy-val.jsonl")},
        checkpoint={"interval": 0, "export_hf": False},
    )
    summary = train(load_recipe(recipe), progress=False)
    steps = _steps(tmp_path / "run")
    acc = [steps[s]["rewards/accuracies"] for s in sorted(steps)]
    margins = [steps[s]["rewards/margins"] for s in sorted(steps)]
    assert acc[0] == 0.0 and margins[0] == 0.0  # the start: policy == reference, all ties
    assert min(acc[-3:]) == 1.0, acc
    assert margins[-1] > margins[1] > 0, margins
    assert steps[10]["loss"] < 0.6, steps[10]["loss"]
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evals if e["kind"] == "eval"][-1]
    assert last["val_rewards/accuracies"] == 1.0 and last["val_rewards/margins"] > 0
    assert summary.final_val_loss == last["val_loss"] < 0.6


# ------------------------------------------------------------------------------ bad input
def test_bad_input_through_the_cli(tmp_path, prefs, capsys):
    recipe = _recipe(tmp_path, prefs, lora=LORA)
    run = tmp_path / "run"
    same = _write(
        tmp_path / "same.jsonl",
        [
            *_pairs(random.Random(1), 2),
            {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "2 "},
        ],
    )
    line = failed_cleanly(*cli(capsys, "train", recipe, "--set", f"dpo.data='{same}'")[::2])
    assert f"{same}:3: chosen and rejected are the same completion" in line
    line = failed_cleanly(*cli(capsys, "train", recipe, "--set", "init.model=''")[::2])
    assert "dpo.data trains a model on preference pairs: set init.model" in line
    missing = tmp_path / "nowhere.jsonl"
    line = failed_cleanly(*cli(capsys, "train", recipe, "--set", f"dpo.data='{missing}'")[::2])
    assert f"dpo.data: {missing}: no such file" in line
    line = failed_cleanly(*cli(capsys, "train", recipe, "--set", "data.dir=x")[::2])
    assert "data.dir is for token datasets; a DPO run reads dpo.data" in line
    line = failed_cleanly(*cli(capsys, "train", recipe, "--set", "train.batch_size=64")[::2])
    assert "48 preference pairs, fewer than one batch of 64" in line
    line = failed_cleanly(*cli(capsys, "train", recipe, "--set", "dpo.max_len=1000")[::2])
    assert "dpo.max_len is 1000, longer than the model's context (max_seq_len 256)" in line
    assert not run.exists()  # nothing half-written
    with pytest.raises(RecipeError, match=r"dpo\.beta must be > 0"):
        load_recipe(recipe, ["dpo.beta=0"])


def test_the_shipped_recipe_runs_with_set(tmp_path, prefs, monkeypatch, capsys):
    """`camelid train dpo-cpu` pointed at another model and pairs with --set, as its comment
    says: a LoRA run that exports its adapter and merged weights."""
    monkeypatch.chdir(tmp_path)
    shipped = load_recipe("dpo-cpu")
    assert shipped.init.model == str(tmp_path / "runs/quickstart/chat/run/hf")  # after SFT
    assert shipped.dpo.data == str(tmp_path / "runs/quickstart/chat/preferences.jsonl")
    assert shipped.dpo.val_data == str(tmp_path / "runs/quickstart/chat/preferences-val.jsonl")
    code = camelid_main(
        [
            "train",
            "dpo-cpu",
            "--set",
            f"init.model='{prefs / 'base'}'",
            "--set",
            f"dpo.data='{prefs / 'prefs.jsonl'}'",
            "--set",
            f"dpo.val_data='{prefs / 'prefs.jsonl'}'",
            "--set",
            "train.steps=2",
            "--set",
            "schedule.warmup_steps=1",
            "--set",
            "dpo.max_len=64",
            "--set",
            "train.seq_len=64",
            "--set",
            "eval.sample_tokens=2",
            "--set",
            "run.peak_tflops=1.0",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    run = tmp_path / "runs" / "dpo-cpu"
    assert "reference: the base with its adapters off" in out and "acc " in out
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "hf" / "model.safetensors").is_file()
