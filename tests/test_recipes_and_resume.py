"""Recipes and resumes that fail cleanly: declared ranges, shipped recipes by name, paths
relative to the recipe file, the three ways to write --resume, and damaged checkpoints.

Bad input runs through the CLI: one line naming the key or file, exit status 1, no traceback,
and nothing lost — an existing run's files untouched, no empty run directory left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import test_train
from conftest import camelid_main
from test_train import events, recipe_file, step_losses

from camelid.train import checkpoint as ckpt
from camelid.train.recipe import (
    load_recipe,
    recipe_keys,
    shipped_dir,
    shipped_recipes,
)
from camelid.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
dataset = test_train.dataset  # the fixture: a tiny corpus, its tokenizer and prepared shards


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = camelid_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def failed_cleanly(code: int, err: str) -> str:
    """The one error line of a clean failure."""
    assert code == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("camelid: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: its mtime and content digest."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def steps_run(run_dir: Path) -> int:
    return max(step_losses(run_dir))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, dataset) -> Path:
    """A finished 4-step run (checkpoints at 0, 2 and 4) that the bad-input tests must not
    touch; returns its recipe."""
    root = tmp_path_factory.mktemp("finished")
    path = recipe_file(root, dataset, train={"steps": 4}, checkpoint={"interval": 2})
    train(load_recipe(path), progress=False)
    return path


# --------------------------------------------------------------------------- ranges
BAD_VALUES = [
    ("optim.beta1=1.5", "optim.beta1 must be in [0, 1), got 1.5"),
    ("optim.beta2=1", "optim.beta2 must be in [0, 1), got 1.0"),
    ("optim.eps=-1", "optim.eps must be > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.min_lr=0.01", "optim.min_lr must be in [0, optim.lr], got 0.01 with optim.lr = 0.003"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("schedule.warmup_steps=5", "schedule.warmup_steps must be in [0, train.steps], got 5 "
     "with train.steps = 4"),
    ("schedule.decay_fraction=1.5", "schedule.decay_fraction must be in [0, 1], got 1.5"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
    ("train.seed=-1", "train.seed must be >= 0, got -1"),
    ("checkpoint.interval=-5", "checkpoint.interval must be >= 0, got -5"),
    ("checkpoint.keep=-1", "checkpoint.keep must be >= 0, got -1"),
    ("eval.interval=-1", "eval.interval must be >= 0, got -1"),
    ("eval.batches=0", "eval.batches must be >= 1, got 0"),
    ("eval.sample_tokens=-4", "eval.sample_tokens must be >= 0, got -4"),
    ("eval.temperature=-0.5", "eval.temperature must be >= 0, got -0.5"),
    ("log.interval=0", "log.interval must be >= 1, got 0"),
    ("guard.window=0", "guard.window must be >= 1, got 0"),
    ("guard.min_history=60", "guard.min_history must be in [1, guard.window], got 60 with "
     "guard.window = 50"),
    ("guard.z_threshold=0", "guard.z_threshold must be > 0, got 0.0"),
    ("guard.max_bad_steps=-1", "guard.max_bad_steps must be >= 0, got -1"),
    ("run.peak_tflops=-2", "run.peak_tflops must be >= 0, got -2.0"),
    ("train.device='tpu'", "train.device must be one of auto, cpu, cuda, got 'tpu'"),
]  # fmt: skip


@pytest.mark.parametrize("setting,message", BAD_VALUES, ids=[s for s, _ in BAD_VALUES])
def test_out_of_range_values_fail_cleanly_and_touch_nothing(
    tmp_path, finished, capsys, setting, message
):
    run = finished.parent / "run"
    before = snapshot(run)
    line = failed_cleanly(*cli(capsys, "train", finished, "--resume", "--set", setting)[::2])
    assert line == f"camelid: error: {message}"
    assert snapshot(run) == before
    # The same value for a new run: no run directory is made.
    new = tmp_path / "new-run"
    failed_cleanly(*cli(capsys, "train", finished, "--set", f"run.out_dir='{new}'",
                        "--set", setting)[::2])  # fmt: skip
    assert not new.exists()


def test_range_edges_are_accepted():
    edges = ["optim.beta1=0", "optim.beta2=0.999", "optim.grad_clip=0", "optim.weight_decay=0",
             "optim.min_lr=0.003", "schedule.warmup_steps=12", "schedule.decay_fraction=1",
             "checkpoint.keep=0", "checkpoint.interval=0", "eval.interval=0", "eval.batches=1",
             "guard.min_history=50", "guard.max_bad_steps=0", "train.steps=12"]  # fmt: skip
    recipe = load_recipe(None, ["data.dir=x", *edges])
    assert (recipe.optim.beta1, recipe.schedule.warmup_steps, recipe.checkpoint.keep) == (0, 12, 0)


def test_docs_table_lists_every_key_with_its_type_default_and_range():
    text = (ROOT / "docs" / "training.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([a-z_0-9]+\.[a-z_0-9]+)` \| ([^|]*) \| `([^`]*)` \| ([^|]*) \|", line)
        if m:
            rows[m[1]] = (m[2].strip(), m[3], m[4].strip())
    assert "model.preset" in rows
    for key in recipe_keys():
        assert key.key in rows, f"docs/training.md: no row for {key.key}"
        type_, default, allowed = rows[key.key]
        assert (type_, default) == (key.type, key.default), key.key
        assert allowed == (key.allowed or "—"), key.key


# -------------------------------------------------------------------------- data
def test_data_that_cannot_make_one_step_fails_before_the_run_directory(tmp_path, dataset, capsys):
    manifest = json.loads((dataset / "data" / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    tokens = sum(s["tokens"] for s in shards)
    path = recipe_file(tmp_path, dataset)
    line = failed_cleanly(*cli(capsys, "train", path, "--set", "train.batch_size=64",
                               "--set", "train.seq_len=512")[::2])  # fmt: skip
    assert f"the train split holds {tokens:,} tokens in {len(shards)} shard(s)" in line
    assert "windows of train.seq_len + 1 = 513 tokens; one step needs train.batch_size" in line
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_run_directory(tmp_path, dataset, capsys):
    path = recipe_file(tmp_path, dataset)
    line = failed_cleanly(*cli(capsys, "train", path, "--set", f"data.dir='{tmp_path}/none'")[::2])
    assert "no such dataset directory" in line
    line = failed_cleanly(*cli(capsys, "train", path, "--resume")[::2])
    assert "no checkpoint to resume from" in line
    line = failed_cleanly(*cli(capsys, "train", path, "--resume", "--fresh")[::2])
    assert "give one of them" in line
    assert not (tmp_path / "run").exists()


def test_an_incompatible_resume_touches_nothing(finished, capsys):
    run = finished.parent / "run"
    before = snapshot(run)
    line = failed_cleanly(*cli(capsys, "train", finished, "--resume",
                               "--set", "train.batch_size=2")[::2])  # fmt: skip
    assert "global batch was 4 sequences" in line
    assert snapshot(run) == before


# --------------------------------------------------------------------- named recipes
def test_shipped_recipes_by_name(tmp_path, monkeypatch, capsys):
    names = shipped_recipes()
    assert {"quickstart", "llama-16m-cpu", "llama-3.2-1b-gpu"} <= set(names)
    monkeypatch.chdir(tmp_path)
    for name in names:
        by_file = load_recipe(shipped_dir() / f"{name}.toml")
        assert load_recipe(name) == by_file == load_recipe(f"{name}.toml")
        # A template's relative paths are the current directory's, also through configs/.
        assert load_recipe(ROOT / "configs" / f"{name}.toml") == by_file
        assert Path(by_file.run.out_dir).is_relative_to(tmp_path)
    line = failed_cleanly(*cli(capsys, "train", "llama-16m-cp")[::2])
    assert "llama-16m-cp: no such recipe file" in line and ", ".join(names) in line
    # By name through the CLI: it reads the recipe, then stops at its (absent) data.
    line = failed_cleanly(*cli(capsys, "train", "llama-16m-cpu")[::2])
    assert f"{tmp_path}/runs/data: no such dataset directory" in line
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        camelid_main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(names) in help_text


def test_unreadable_recipe_files_fail_cleanly(tmp_path, capsys):
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00binary")
    line = failed_cleanly(*cli(capsys, "train", tmp_path / "bin.toml")[::2])
    assert "bin.toml: not a text file" in line
    line = failed_cleanly(*cli(capsys, "train", tmp_path)[::2])
    assert "is a directory, not a recipe file" in line
    with pytest.raises(SystemExit) as exit_:
        camelid_main(["train"])
    assert exit_.value.code == 2 and "a RECIPE is required" in capsys.readouterr().err


# -------------------------------------------------------------------------- paths
def test_relative_paths_resolve_against_the_recipe_file(tmp_path, dataset, monkeypatch, capsys):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    path = recipe_file(project, dataset, train={"steps": 4})
    text = path.read_text().replace(
        json.dumps(str(dataset / "data")), json.dumps(os.path.relpath(dataset / "data", project))
    )
    path.write_text(text.replace(json.dumps(str(project / "run")), '"run"'))  # fmt: skip
    assert '"run"' in path.read_text() and '"../' in path.read_text()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli(capsys, "train", path)
    assert code == 0, err
    assert steps_run(project / "run") == 4 and not (elsewhere / "run").exists()
    saved = load_recipe(project / "run" / "recipe.toml")
    assert saved.data.dir == str(dataset / "data") and saved.run.out_dir == str(project / "run")
    text = (project / "run" / "recipe.toml").read_text()
    assert f'dir = "{dataset / "data"}"' in text and f'out_dir = "{project / "run"}"' in text
    # The resume command works from any directory; --set paths are the current directory's.
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", project / "run" / "recipe.toml", "--resume",
                       "--set", "train.steps=6")  # fmt: skip
    assert code == 0, err
    assert steps_run(project / "run") == 6
    assert load_recipe(path, ["run.out_dir=out"]).run.out_dir == str(tmp_path / "out")


def test_written_recipe_makes_relative_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(None, ["data.dir=x"])
    recipe.data.dir, recipe.run.out_dir = "data", "runs/r"  # as quickstart sets them
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "recipe.toml").write_text(recipe.to_toml())
    again = load_recipe(tmp_path / "sub" / "recipe.toml")
    assert (again.data.dir, again.run.out_dir) == (str(tmp_path / "data"), str(tmp_path / "runs/r"))


# ------------------------------------------------------------------------- resume
def test_three_ways_to_write_resume(tmp_path, dataset, capsys):
    path = recipe_file(tmp_path, dataset, train={"steps": 4}, checkpoint={"interval": 2})
    run = tmp_path / "run"
    assert cli(capsys, "train", path)[0] == 0
    code, _, err = cli(capsys, "train", "--resume", path, "--set", "train.steps=6")
    assert code == 0, err
    assert steps_run(run) == 6
    code, _, err = cli(capsys, "train", path, "--resume", "--set", "train.steps=8")
    assert code == 0, err
    assert steps_run(run) == 8
    step4 = run / "checkpoints" / "step-00000004"
    code, _, err = cli(capsys, "train", path, "--resume", step4, "--set", "train.steps=10")
    assert code == 0, err
    resumes = [e["detail"] for e in events(run) if e["event"] == "resume"]
    assert resumes[-1] == str(step4) and steps_run(run) == 10
    # --resume and the recipe in the other order, with a checkpoint directory
    code, _, err = cli(capsys, "train", "--resume", step4, path, "--set", "train.steps=10")
    assert code == 0, err


def damage(checkpoint: Path, kind: str) -> str:
    """Damage a checkpoint as a disk or a kill might; returns what usable() should name."""
    distcp = sorted(checkpoint.glob("*.distcp"))[0]
    if kind == "truncated":
        data = distcp.read_bytes()
        distcp.write_bytes(data[: len(data) // 2])
        return f"{distcp.name}: truncated"
    if kind == "missing":
        distcp.unlink()
        return f"{distcp.name}, which its .metadata lists, is missing"
    if kind == "metadata":
        (checkpoint / ".metadata").write_bytes(b"\x80\x04garbage")
        return ".metadata is unreadable"
    if kind == "trainer.json":
        (checkpoint / "trainer.json").write_text('{"step": 4, "tok')
        return "trainer.json is unreadable"
    if kind == "rng":
        rng = checkpoint / "rng-0.pt"
        rng.write_bytes(rng.read_bytes()[:20])
        return "rng-0.pt is unreadable"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "missing", "metadata", "trainer.json", "rng"])
def test_usable_names_each_kind_of_damage(tmp_path, finished, kind):
    good = finished.parent / "run" / "checkpoints" / "step-00000004"
    assert ckpt.usable(good) is None
    copy = tmp_path / "step-00000004"
    shutil.copytree(good, copy)
    expected = damage(copy, kind)
    assert expected in ckpt.usable(copy)


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, dataset, capsys):
    path = recipe_file(tmp_path, dataset, train={"steps": 8}, checkpoint={"interval": 4})
    run = tmp_path / "run"
    assert cli(capsys, "train", path)[0] == 0
    newest = run / "checkpoints" / "step-00000008"
    reason = damage(newest, "truncated")
    code, _, err = cli(capsys, "train", path, "--resume", "--set", "train.steps=10")
    assert code == 0, err
    assert f"camelid: warning: {newest} is not usable: {reason}" in err
    assert f"resuming from {run / 'checkpoints' / 'step-00000004'} instead" in err
    ev = [e for e in events(run) if e["event"] in ("checkpoint_unusable", "resume")]
    assert [(e["event"], e["step"]) for e in ev] == [("checkpoint_unusable", 4), ("resume", 4)]
    assert ev[0]["detail"].startswith(f"{newest}: {reason}")
    assert ev[1]["detail"] == str(run / "checkpoints" / "step-00000004")
    assert steps_run(run) == 10 and ckpt.usable(run / "checkpoints" / "step-00000008") is None


def test_no_usable_checkpoint_stops_cleanly_and_touches_nothing(tmp_path, dataset, capsys):
    path = recipe_file(tmp_path, dataset, train={"steps": 4}, checkpoint={"interval": 2})
    run = tmp_path / "run"
    assert cli(capsys, "train", path)[0] == 0
    kinds = ["truncated", "metadata", "rng"]
    for checkpoint, kind in zip(ckpt.list_checkpoints(run), kinds, strict=True):
        damage(checkpoint, kind)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", path, "--resume", "--set", "train.steps=6")
    line = failed_cleanly(code, err)
    assert f"{run}: no usable checkpoint to resume from" in line
    assert err.count("camelid: warning:") == 3 and snapshot(run) == before
    # A checkpoint named explicitly is never substituted.
    step2 = run / "checkpoints" / "step-00000002"
    line = failed_cleanly(*cli(capsys, "train", path, "--resume", step2)[::2])
    assert line.startswith(f"camelid: error: {step2}: not a usable checkpoint: .metadata is")
    line = failed_cleanly(*cli(capsys, "train", path, "--resume", tmp_path)[::2])
    assert "not a usable checkpoint: no trainer.json" in line
    line = failed_cleanly(*cli(capsys, "train", path, "--resume", run)[::2])
    assert f"{run}: a run directory, not a checkpoint" in line
    assert snapshot(run) == before


def test_damage_only_loading_finds_is_named(finished, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("invalid load key, 'x'.\nmore detail")

    monkeypatch.setattr(ckpt.dcp, "load", fail)
    recipe = load_recipe(finished, ["train.steps=6"])
    with pytest.raises(ckpt.CheckpointError) as err:
        train(recipe, resume="latest", progress=False)
    newest = ckpt.list_checkpoints(finished.parent / "run")[-1]
    assert str(err.value) == f"{newest}: cannot load the checkpoint (invalid load key, 'x'.)"


def test_roll_back_passes_over_a_damaged_checkpoint(tmp_path, dataset, monkeypatch):
    real_save = ckpt.save

    def save_then_damage(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 20:
            damage(path, "truncated")
        return path

    monkeypatch.setattr(ckpt, "save", save_then_damage)
    recipe = load_recipe(recipe_file(
        tmp_path, dataset, train={"steps": 26}, checkpoint={"interval": 10},
        guard={"drill": ["nan:20", "nan:21", "nan:22"], "min_history": 5},
    ))  # fmt: skip
    summary = train(recipe, progress=False)
    ev = events(tmp_path / "run")
    unusable = [e for e in ev if e["event"] == "checkpoint_unusable"]
    assert len(unusable) == 1 and "step-00000020" in unusable[0]["detail"]
    rollback = next(e for e in ev if e["event"] == "rollback")
    assert rollback["step"] == 10 and "steps 11..23" in rollback["detail"]
    assert summary.status == "finished" and summary.steps == 26


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_recipe_on_a_machine_without_cuda_fails_cleanly(tmp_path, finished, capsys):
    new = tmp_path / "gpu-run"
    line = failed_cleanly(*cli(capsys, "train", finished, "--set", f"run.out_dir='{new}'",
                               "--set", "train.device='cuda'")[::2])  # fmt: skip
    assert "train.device = cuda, but CUDA is not available here" in line
    assert not new.exists()
