"""A model out of every run: `camelid export`, MODEL as a run or a checkpoint for generate /
chat / inspect / convert, complete directories (tokenizer, token ids, stop ids) that
transformers stops on where camelid does, and the files' permissions."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import camelid_main, needs_hf
from safetensors.torch import load_file, save_file
from test_train import dataset, recipe_file  # noqa: F401  (dataset is a fixture)

from camelid.errors import CheckpointError
from camelid.infer import Engine
from camelid.infer.engine import default_stop_ids
from camelid.infer.export import save_pretrained
from camelid.infer.load import resolve_model, run_tokenizer
from camelid.io import atomic_path
from camelid.tokenizer import Tokenizer
from camelid.train.recipe import load_recipe
from camelid.train.trainer import train
from camelid.weights import checkpoint as ckpt

PROMPT = "def f(x):\n    return"


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset) -> Path:  # noqa: F811
    """A finished 8-step run (checkpoints at 0, 4 and 8, and its export RUN/hf), trained with
    activation checkpointing: its checkpoints must hold the plain parameter names."""
    root = tmp_path_factory.mktemp("export-run")
    recipe = recipe_file(root, dataset, train={"steps": 8, "activation_checkpointing": True})
    train(load_recipe(recipe), progress=False)
    return root / "run"


@pytest.fixture
def stopped(run, tmp_path) -> Path:
    """The same run as one stopped before its end would leave it: checkpoints, no export."""
    copy = tmp_path / "stopped"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "hf")
    return copy


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = camelid_main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


def one_error(capsys, *argv) -> str:
    """A bad input: exit 1, one line `camelid: error: ...` on stderr, no traceback."""
    code, _, err = cli(capsys, *argv)
    assert code == 1, err
    assert err.startswith("camelid: error: ") and err.count("\n") == 1, err
    return err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*"))}  # fmt: skip


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def greedy(capsys, model, *extra) -> tuple[str, str]:
    code, out, err = cli(capsys, "generate", model, "-p", PROMPT, "-n", 12, "--greedy",
                         "--device", "cpu", *extra)  # fmt: skip
    assert code == 0, err
    return out, err


# ------------------------------------------------------------------------------- camelid export
def test_export_of_a_run_is_the_trainers_export_and_leaves_the_run_alone(capsys, run, tmp_path):
    before = snapshot(run)
    code, out, err = cli(capsys, "export", run, tmp_path / "out")
    assert code == 0, err
    newest = run / "checkpoints" / "step-00000008"
    assert f"exported {newest} (step 8) -> {tmp_path / 'out'}" in out
    tokenizer = run / "tokenizer"
    assert (
        err
        == f"read {newest} (step 8); writing {tmp_path / 'out'} with the tokenizer {tokenizer}\n"
    )
    assert snapshot(run) == before  # nothing written, touched or removed in the run
    ours, trainers = tensors(tmp_path / "out"), tensors(run / "hf")
    assert ours.keys() == trainers.keys() and len(ours) == 3 + 2 * 9
    for name, t in trainers.items():
        assert t.dtype == ours[name].dtype and torch.equal(t, ours[name]), name
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):  # fmt: skip
        assert (tmp_path / "out" / name).read_bytes() == (run / "hf" / name).read_bytes(), name
    assert not list(tmp_path.glob(".out.tmp*"))  # the staging directory is gone


def test_export_of_one_checkpoint(capsys, run, tmp_path):
    step4 = run / "checkpoints" / "step-00000004"
    code, out, _ = cli(capsys, "export", step4, tmp_path / "four", "--dtype", "bfloat16",
                       "--max-shard-size", "100KB")  # fmt: skip
    assert code == 0 and f"exported {step4} (step 4)" in out and "bfloat16" in out
    four = tmp_path / "four"
    assert (four / "model.safetensors.index.json").exists()
    direct = ckpt.load(step4)
    exported = resolve_model(four)
    assert exported.kind == "hf" and exported.path == four
    from camelid import load

    back = load(four, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(direct.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    final = ckpt.load(run / "checkpoints" / "step-00000008")
    assert not torch.equal(direct.norm.weight, final.norm.weight)  # really another step's


def test_the_checkpoints_hold_plain_names(run):
    """Trained with activation checkpointing, saved under the module's own names: readable by
    a plain Transformer, and inspected from the DCP index without reading tensors."""
    info = ckpt.inspect_checkpoint(run / "checkpoints" / "step-00000008")
    assert info.config.vocab_size == Tokenizer.load(run / "tokenizer").vocab_size
    assert info.dtype == torch.float32 and info.nbytes == 4 * info.config.num_params()
    assert [f.name for f in info.files] == ["__0_0.distcp"]


def test_export_bad_inputs(capsys, run, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    err = one_error(capsys, "export", plain, tmp_path / "o")
    assert f"{plain}: not a training run or checkpoint" in err
    err = one_error(capsys, "export", run / "hf", tmp_path / "o")
    assert "is a Hugging Face directory" in err and "camelid convert" in err
    err = one_error(capsys, "export", tmp_path / "absent", tmp_path / "o")
    assert "absent: no such directory" in err
    gone = run / "checkpoints" / "step-00000002"  # removed by checkpoint.keep, or a typo
    for argv in (["export", gone, tmp_path / "o"], ["generate", gone, "-p", "x"]):
        err = one_error(capsys, *argv)
        assert f"{gone}: no such directory; checkpoints of {run}: step-00000000" in err

    empty = tmp_path / "empty-run"
    (empty / "checkpoints" / ".step-00000004.tmp").mkdir(parents=True)
    err = one_error(capsys, "export", empty, tmp_path / "o")
    assert f"{empty}: training run with no complete checkpoint yet" in err
    assert ".step-00000004.tmp" in err

    torn_run = tmp_path / "torn"
    shutil.copytree(run, torn_run)
    torn = torn_run / "checkpoints" / "step-00000008"
    (torn / "trainer.json").unlink()
    err = one_error(capsys, "export", torn, tmp_path / "o")
    assert f"{torn}: not a complete checkpoint (no trainer.json" in err
    assert "step-00000000, step-00000004" in err
    # the run itself falls back to its newest complete checkpoint
    code, out, _ = cli(capsys, "export", torn_run, tmp_path / "o4")
    assert code == 0 and "step-00000004 (step 4)" in out

    shard = torn_run / "checkpoints" / "step-00000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:4096])  # into the model's tensors
    err = one_error(capsys, "export", torn_run, tmp_path / "o5")
    assert f"{shard}: truncated" in err
    assert (
        f"to export the one before it: camelid export {shard.parent.parent / 'step-00000000'}"
        in err
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o5").exists()

    (tmp_path / "file").write_text("x")
    err = one_error(capsys, "export", run, tmp_path / "file")
    assert "file: exists and is a file" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    err = one_error(capsys, "export", run, full)
    assert "full: exists and is not empty; pass --overwrite" in err
    err = one_error(capsys, "export", run, run / "checkpoints")
    assert "would write into or over the checkpoint" in err
    code, _, _ = cli(capsys, "export", run, full, "--overwrite")
    assert code == 0 and (full / "notes.txt").read_text() == "mine"
    assert resolve_model(full).kind == "hf"


def test_damaged_tensor_is_not_exported(capsys, run, tmp_path):
    """DCP keeps no checksums: bytes flipped inside a tensor are caught as non-finite values,
    by export and by generate, and export names the earlier checkpoint to use."""
    from torch.distributed.checkpoint import FileSystemReader

    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "hf")
    newest = copy / "checkpoints" / "step-00000008"
    index = FileSystemReader(str(newest)).read_metadata().storage_data
    where = next(w for i, w in index.items() if i.fqn == "model.tok_embeddings.weight")
    data = bytearray((newest / where.relative_path).read_bytes())
    middle = where.offset + where.length // 2
    data[middle : middle + 32] = b"\xff" * 32  # NaN as float32
    (newest / where.relative_path).write_bytes(bytes(data))
    err = one_error(capsys, "export", copy, tmp_path / "o")
    assert f"{newest}: tensor tok_embeddings.weight holds NaN or infinite values" in err
    assert f"camelid export {copy / 'checkpoints' / 'step-00000004'} {tmp_path / 'o'}" in err
    assert not (tmp_path / "o").exists()
    code, _, err = cli(capsys, "generate", copy, "-p", "x", "--device", "cpu")
    assert code == 1 and "holds NaN or infinite values" in err.splitlines()[-1]


def test_export_help(capsys):
    with pytest.raises(SystemExit):
        camelid_main(["export", "--help"])
    out = capsys.readouterr().out
    assert "usage: camelid export" in out and "examples:" in out and "--overwrite" in out
    with pytest.raises(SystemExit):
        camelid_main(["--help"])
    assert "export" in capsys.readouterr().out


# --------------------------------------------------------------- MODEL: a run or a checkpoint
def test_generate_on_a_run_without_export_reads_its_checkpoint(capsys, run, stopped):
    exported, err = greedy(capsys, run)
    assert f"{run}: training run; using its export {run / 'hf'}" in err
    text, err = greedy(capsys, stopped)
    assert text == exported  # the newest checkpoint holds the exported weights
    newest = stopped / "checkpoints" / "step-00000008"
    assert (
        f"{stopped}: training run, no export; reading its newest checkpoint {newest} (step 8) "
        f"directly (nothing is written); to export it: camelid export {stopped} {stopped / 'hf'}"
    ) in err
    assert f"loaded {newest} (" in err
    quiet, err = greedy(capsys, stopped, "-q")
    assert quiet == exported and err == ""

    # the suggested command does what it says; the run then resolves to its export
    code, _, _ = cli(capsys, "export", stopped, stopped / "hf")
    assert code == 0
    assert resolve_model(stopped).path == stopped / "hf"
    text, err = greedy(capsys, stopped)
    assert text == exported and "using its export" in err


def test_an_export_older_than_the_newest_checkpoint_is_not_used(run, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)  # copytree keeps the modification times
    state = copy / "checkpoints" / "step-00000008" / "trainer.json"
    old = state.stat().st_mtime_ns - 10**9
    os.utime(copy / "hf" / "config.json", ns=(old, old))  # as if training went on after it
    source = resolve_model(copy)
    assert source.kind == "checkpoint" and source.step == 8
    assert f"its export {copy / 'hf'} is older than its newest checkpoint" in source.note
    assert source.note.endswith(f"camelid export {copy} {copy / 'hf'} --overwrite")


def test_a_checkpoint_directory_as_model(capsys, monkeypatch, run, tmp_path):
    step4 = run / "checkpoints" / "step-00000004"
    text, err = greedy(capsys, step4)
    assert (
        f"{step4}: checkpoint of step 4 of run {run}; reading it directly (nothing is "
        f"written); to export it: camelid export {step4} {run / 'hf-step-4'}"
    ) in err
    code, _, _ = cli(capsys, "export", step4, tmp_path / "four")
    assert code == 0 and greedy(capsys, tmp_path / "four")[0] == text

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, err = cli(capsys, "chat", step4, "--greedy", "-n", 6, "--device", "cpu")
    assert code == 0 and f"{step4}: checkpoint of step 4" in err and out.strip()

    code, out, err = cli(capsys, "inspect", step4, "--forward", "--json")
    assert code == 0 and f"{step4}: checkpoint of step 4" in err
    figures = json.loads(out)
    assert figures["checkpoint"]["files"] == [str(step4 / "__0_0.distcp")]
    vocab = Tokenizer.load(run / "tokenizer").vocab_size
    assert figures["forward"]["logits_shape"][-1] == vocab

    code, out, err = cli(capsys, "convert", step4, tmp_path / "conv")
    assert code == 0 and "converted" in out and f"{step4}: checkpoint of step 4" in err
    for name in ("tokenizer.json", "generation_config.json", "model.safetensors"):
        assert (tmp_path / "conv" / name).read_bytes() == (tmp_path / "four" / name).read_bytes()


def test_run_errors_through_the_commands(capsys, run, tmp_path):
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    for argv in (["generate", bare, "-p", "x"], ["inspect", bare], ["convert", bare, tmp_path]):
        err = one_error(capsys, *argv)
        assert f"{bare} is a training run that has not exported weights" in err
        assert "no complete checkpoint" in err
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(run, no_tok)
    shutil.rmtree(no_tok / "hf")
    shutil.rmtree(no_tok / "tokenizer")
    (no_tok / "recipe.toml").write_text('[data]\ndir = "nowhere"\ntokenizer = "gone"\n')
    for argv in (["generate", no_tok, "-p", "x"], ["export", no_tok, tmp_path / "o"]):
        err = one_error(capsys, *argv)
        assert f"{no_tok}: cannot find the tokenizer it was trained with; tried" in err
        assert f"{no_tok / 'tokenizer'} (none)" in err and "gone" in err
    # inspect needs no tokenizer
    code, out, _ = cli(capsys, "inspect", no_tok)
    assert code == 0 and "checkpoint   1 file(s), float32" in out


def test_an_older_run_finds_its_tokenizer(run, dataset, tmp_path):  # noqa: F811
    """Runs from before RUN/tokenizer: the recipe's data.tokenizer, else the tokenizer the
    dataset's manifest names — never one that is not the tokenizer the data was prepared with."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    shutil.rmtree(old / "tokenizer")
    manifest = json.loads((dataset / "data" / "manifest.json").read_text())
    assert run_tokenizer(old) == Path(manifest["tokenizer"]["path"])

    other = tmp_path / "other"  # the tokenizer directory retrained since: another tokenizer
    shutil.copytree(dataset / "tok", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    recipe = (old / "recipe.toml").read_text()
    (old / "recipe.toml").write_text(recipe.replace('tokenizer = ""', f'tokenizer = "{other}"'))
    assert f'tokenizer = "{other}"' in (old / "recipe.toml").read_text()
    assert run_tokenizer(old) == Path(manifest["tokenizer"]["path"])

    # a relative data.dir is found against the run directory
    shutil.copytree(dataset / "data", old / "data-copy")
    manifest["tokenizer"]["path"] = str(other)
    (old / "data-copy" / "manifest.json").write_text(json.dumps(manifest))
    recipe = (old / "recipe.toml").read_text()
    (old / "recipe.toml").write_text(recipe.replace(str(dataset / "data"), "data-copy"))
    with pytest.raises(CheckpointError) as e:
        run_tokenizer(old)
    assert f"{other} (the dataset's: another tokenizer than the data's)" in str(e.value)


# ---------------------------------------------------------------------- complete directories
def test_convert_keeps_the_tokenizer_files_and_token_ids(capsys, run, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(run / "hf", src)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], 374]  # a Meta-style list stays as it is
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "convert", src, tmp_path / "dst", "--dtype", "bfloat16")
    assert code == 0 and err == ""
    dst = tmp_path / "dst"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja"):  # fmt: skip
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    out_cfg = json.loads((dst / "config.json").read_text())
    assert out_cfg["eos_token_id"] == cfg["eos_token_id"] and out_cfg["torch_dtype"] == "bfloat16"
    assert out_cfg["bos_token_id"] == cfg["bos_token_id"]

    # a directory without token ids or generation_config gets them from its tokenizer
    for name in ("generation_config.json", "chat_template.jinja"):
        (src / name).unlink()
    for key in ("bos_token_id", "eos_token_id"):
        cfg.pop(key)
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli(capsys, "convert", src, tmp_path / "dst2")[0] == 0
    tok = Tokenizer.load(src)
    out_cfg = json.loads((tmp_path / "dst2" / "config.json").read_text())
    assert (out_cfg["bos_token_id"], out_cfg["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    generation = json.loads((tmp_path / "dst2" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tok.bos_id, "eos_token_id": list(default_stop_ids(tok))}


def test_exported_directory_lists_every_stop_id(run):
    tok = Tokenizer.load(run / "tokenizer")
    names = {i: n for n, i in tok.special_tokens.items()}
    generation = json.loads((run / "hf" / "generation_config.json").read_text())
    stops = [names[i] for i in generation["eos_token_id"]]
    assert stops == ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    config = json.loads((run / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)


def test_transformers_stops_where_camelid_stops(run, tmp_path):
    """Greedy decoding of an exported model: transformers' generate gives camelid's tokens and
    stops on the same end-of-turn token — because generation_config.json lists it."""
    needs_hf()
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.load(run / "tokenizer")
    model = ckpt.load(run / "checkpoints" / "step-00000008")
    prompt = tok.encode(PROMPT, bos=True)
    _make_it_end_its_turn(model, tok, prompt, after=6)
    out = tmp_path / "ends"
    save_pretrained(model, tok, out)

    engine = Engine(model, tok, max_batch_size=1)
    ours = engine.generate(prompt, max_new_tokens=30, temperature=0)
    assert ours.finish_reason == "stop" and len(ours.token_ids) == 6
    theirs_model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()

    def theirs() -> list[int]:
        with torch.no_grad():
            ids = theirs_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30)
        return ids[0, len(prompt) :].tolist()

    assert theirs() == [*ours.token_ids, tok.eot_id]
    assert tok.decode(theirs()[:-1]) == ours.text
    # without the stop ids in generation_config.json, transformers would run past the turn end
    (out / "generation_config.json").unlink()
    theirs_model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert theirs()[: len(ours.token_ids) + 1] == [*ours.token_ids, tok.eot_id]
    assert len(theirs()) > len(ours.token_ids) + 1


def _make_it_end_its_turn(model, tok: Tokenizer, prompt: list[int], after: int) -> None:
    """Edit the output row of <|eot_id|> so that greedy decoding from ``prompt`` emits it
    after exactly ``after`` tokens: the row that gives, on the final hidden states of the
    greedy continuation, a logit 1 below the best one at each earlier step and 1 above it at
    step ``after`` (the minimum-norm solution of those few equations)."""
    engine = Engine(model, tok, max_batch_size=1)
    first = engine.generate(prompt, max_new_tokens=after, temperature=0, ignore_eos=True)
    assert not set(first.token_ids) & set(engine.stop_token_ids)
    seq = torch.tensor([prompt + first.token_ids])
    hidden = {}
    handle = model.norm.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    with torch.no_grad():
        logits = model(seq)[0]
    handle.remove()
    steps = range(len(prompt) - 1, seq.shape[1])  # the positions whose next token is generated
    h = hidden["h"][0, steps].double()
    best = logits[steps].max(-1).values.double()
    want = best - 1.0
    want[-1] = best[-1] + 1.0
    with torch.no_grad():
        model.output.weight[tok.eot_id] = (torch.linalg.pinv(h) @ want).float()
        after_edit = model(seq)[0][steps].argmax(-1).tolist()
    assert after_edit == [*first.token_ids, tok.eot_id]


# ------------------------------------------------------------------------------- permissions
def test_written_files_get_the_mode_of_a_plain_open(run, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        for directory in (run / "hf", run / "tokenizer"):
            for f in directory.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        assert cli(capsys, "export", run, tmp_path / "e")[0] == 0
        assert (
            cli(capsys, "convert", run / "hf", tmp_path / "c", "--max-shard-size", "100KB")[0] == 0
        )
        for f in [*(tmp_path / "e").iterdir(), *(tmp_path / "c").iterdir()]:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.umask(0o027)
        with atomic_path(tmp_path / "x.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors itself creates it 0600
        assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_no_model_directory_is_written_over_a_run(capsys, run, tmp_path):
    """A run stays a run: neither export nor convert writes into it (but RUN/hf) or among its
    checkpoints, and convert does not write over its own source."""
    before = snapshot(run)
    newest = run / "checkpoints" / "step-00000008"
    cases = [
        (["export", run, run / "checkpoints" / "mine"], "is inside the checkpoints of the run"),
        (["export", newest.parent / "step-00000004", newest / "x"], "inside the checkpoints"),
        (["convert", run, run], "is a training run; name a directory outside it"),
        (["convert", run, run / "checkpoints" / "mine"], "is inside the checkpoints of the run"),
        (["convert", run, run / "hf"], "is the directory being converted"),
    ]
    for argv, needle in cases:
        assert needle in one_error(capsys, *argv), argv
    assert snapshot(run) == before
