"""The weights digest: one SHA-256 over the tensors (not the files), the same for a model in
memory, its export, the export re-sharded, re-saved or converted without a cast, and a training
checkpoint; another for one ulp, a renamed tensor or another dtype. Then `camelid digest` and
the model card every export writes."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import camelid_main, random_llama_dir
from safetensors.torch import load_file, save_file
from test_train import dataset, recipe_file  # noqa: F401  (dataset is a fixture)

import camelid
from camelid.infer.export import model_card, read_model_card
from camelid.infer.load import resolve_model
from camelid.train.recipe import load_recipe
from camelid.train.trainer import train
from camelid.weights import hf
from camelid.weights.digest import (
    directory_digest,
    model_digest,
    source_digest,
    tensors_digest,
)


def tiny(seed: int = 0, **overrides) -> camelid.Transformer:
    torch.manual_seed(seed)
    return camelid.Transformer(camelid.ModelConfig.from_preset("tiny", **overrides))


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = camelid_main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


def digest_json(capsys, model: Path) -> dict:
    code, out, err = cli(capsys, "digest", model, "--json")
    assert code == 0, err
    return json.loads(out)


def file_hashes(directory: Path) -> set[str]:
    return {hashlib.sha256(f.read_bytes()).hexdigest() for f in directory.glob("*.safetensors")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset) -> Path:  # noqa: F811
    """A finished 4-step run: checkpoints at steps 0 and 4 and its export RUN/hf."""
    root = tmp_path_factory.mktemp("digest-run")
    train(load_recipe(recipe_file(root, dataset, train={"steps": 4})), progress=False)
    return root / "run"


# ------------------------------------------------------------------------------ the bytes
def test_the_framing_is_the_documented_one():
    """An independent implementation of the module docstring's byte stream."""
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16),  # hashed as its own 2 bytes each
        "a.norm": torch.randn(7),
        "é": torch.zeros(0, 4, dtype=torch.float16),
    }

    def u64(*values: int) -> bytes:
        return struct.pack(f"<{len(values)}Q", *values)

    h = hashlib.sha256()
    for name, dtype in (("a.norm", "F32"), ("b.weight", "BF16"), ("é", "F16")):
        t = tensors[name]
        raw = t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes()
        h.update(u64(len(name.encode())) + name.encode() + u64(len(dtype)) + dtype.encode())
        h.update(u64(t.dim(), *t.shape) + u64(len(raw)) + raw)
    assert tensors_digest(tensors) == h.hexdigest()
    assert len(h.hexdigest()) == 64 and h.hexdigest() == h.hexdigest().lower()


def test_names_shapes_and_dtypes_are_framed():
    x = torch.arange(6, dtype=torch.float32)
    base = tensors_digest({"ab": x[:3], "c": x[3:]})
    assert tensors_digest({"a": x[:3], "bc": x[3:]}) != base  # names cannot run together
    assert tensors_digest({"ab": x[:3], "d": x[3:]}) != base  # a renamed tensor
    assert tensors_digest({"ab": x[:3], "c": x[3:].view(torch.int32)}) != base  # same bytes
    assert tensors_digest({"m": x.reshape(2, 3)}) != tensors_digest({"m": x.reshape(3, 2)})
    assert tensors_digest({"c": x[3:], "ab": x[:3]}) == base  # the order given does not count


# ------------------------------------------------------------------- one digest per weights
def test_model_export_reshard_and_resave_share_one_digest(tmp_path):
    model = tiny()
    want = model_digest(model)
    camelid.save(model, tmp_path / "one")
    camelid.save(model, tmp_path / "many", max_shard_size="60KB")
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 3
    assert file_hashes(tmp_path / "one").isdisjoint(file_hashes(tmp_path / "many"))
    assert directory_digest(tmp_path / "one") == want
    assert directory_digest(tmp_path / "many") == want
    again = camelid.load(tmp_path / "many")
    assert model_digest(again) == want
    camelid.save(again, tmp_path / "again")
    assert directory_digest(tmp_path / "again") == want
    # the tied head is hashed once, as HF writes it: no lm_head.weight
    tied = tiny(tie_embeddings=True)
    assert "lm_head.weight" not in dict(hf.hf_tensors(tied))
    camelid.save(tied, tmp_path / "tied")
    assert directory_digest(tmp_path / "tied") == model_digest(tied)


def test_a_directory_written_by_transformers(tmp_path):
    """HF's own save (its metadata, its tied-head handling) hashes as camelid's model of it."""
    path = random_llama_dir(tmp_path / "hf")
    model = camelid.load(path)
    assert directory_digest(path) == model_digest(model)
    camelid.save(model, tmp_path / "ours", max_shard_size="100KB")
    assert directory_digest(tmp_path / "ours") == directory_digest(path)


def test_file_metadata_does_not_count(tmp_path):
    model = tiny()
    camelid.save(model, tmp_path / "a")
    file = tmp_path / "a" / "model.safetensors"
    before, tensors = file.read_bytes(), load_file(file)
    reordered = dict(reversed(list(tensors.items())))
    save_file(reordered, str(file), metadata={"format": "pt", "written_by": "someone else"})
    assert file.read_bytes() != before
    assert directory_digest(tmp_path / "a") == model_digest(model)


def test_one_ulp_a_cast_and_a_rename_change_it(tmp_path):
    model = tiny()
    want = model_digest(model)
    with torch.no_grad():
        w = model.layers[1].feed_forward.w2.weight
        old = w[3, 5].clone()
        w[3, 5] = torch.nextafter(old, torch.tensor(float("inf")))
        assert w[3, 5] != old
    assert model_digest(model) != want
    camelid.save(model, tmp_path / "ulp")
    assert directory_digest(tmp_path / "ulp") == model_digest(model) != want

    bf16 = tiny().to(torch.bfloat16)
    assert model_digest(bf16) not in (want, model_digest(tiny().half()))
    camelid.save(bf16, tmp_path / "bf16")
    assert directory_digest(tmp_path / "bf16") == model_digest(bf16)
    with torch.no_grad():  # one bf16 ulp
        e = bf16.tok_embeddings.weight
        e[0, 0] = torch.nextafter(e[0, 0], torch.tensor(float("inf"), dtype=torch.bfloat16))
    assert model_digest(bf16) != directory_digest(tmp_path / "bf16")

    tensors = dict(hf.hf_tensors(tiny()))
    tensors["model.norm.scale"] = tensors.pop("model.norm.weight")
    assert tensors_digest(tensors) != want


def test_big_tensors_are_hashed_in_slices(tmp_path, monkeypatch):
    from camelid.weights import digest

    model = tiny()
    camelid.save(model, tmp_path / "m")
    slices: dict[str, int] = {}
    whole = digest._slices

    def counted(file, name, shape, nbytes):
        for part in whole(file, name, shape, nbytes):
            slices[name] = slices.get(name, 0) + 1
            yield part

    monkeypatch.setattr(digest, "_slices", counted)
    monkeypatch.setattr(digest, "_CHUNK_BYTES", 1000)  # the embedding: 171 slices of 3 rows
    assert directory_digest(tmp_path / "m", progress=True) == model_digest(model)
    assert slices["model.embed_tokens.weight"] == 171 and slices["model.norm.weight"] == 1


def test_convert_keeps_it_unless_it_casts(capsys, tmp_path):
    camelid.save(tiny(), tmp_path / "src")
    want = directory_digest(tmp_path / "src")
    code, _, err = cli(capsys, "convert", tmp_path / "src", tmp_path / "sharded",
                       "--max-shard-size", "50KB")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "sharded" / hf.INDEX_NAME).is_file()
    assert directory_digest(tmp_path / "sharded") == want
    code, _, err = cli(
        capsys, "convert", tmp_path / "src", tmp_path / "bf16", "--dtype", "bfloat16"
    )
    assert code == 0, err
    cast = directory_digest(tmp_path / "bf16")
    assert cast != want
    assert cli(capsys, "convert", tmp_path / "bf16", tmp_path / "bf16-again")[0] == 0  # keeps bf16
    assert directory_digest(tmp_path / "bf16-again") == cast


def test_a_checkpoint_hashes_as_its_export(capsys, run, tmp_path):
    step4 = run / "checkpoints" / "step-00000004"
    source = resolve_model(step4, need_tokenizer=False)
    assert source.kind == "checkpoint"
    assert cli(capsys, "export", step4, tmp_path / "out")[0] == 0
    assert source_digest(source) == directory_digest(tmp_path / "out")
    assert source_digest(resolve_model(run / "checkpoints" / "step-00000000")) != source_digest(
        source
    )
    assert cli(capsys, "export", step4, tmp_path / "bf", "--dtype", "bfloat16")[0] == 0
    assert directory_digest(tmp_path / "bf") != source_digest(source)  # not its stored dtype


# ------------------------------------------------------------------------- camelid digest
def test_digest_command(capsys, run, tmp_path):
    code, out, err = cli(capsys, "digest", run / "hf")
    assert code == 0, err
    weights, tok = directory_digest(run / "hf"), camelid.Tokenizer.load(run / "hf").digest
    assert f"weights    {weights}\n" in out and f"tokenizer  {tok} " in out
    got = digest_json(capsys, run / "hf")
    assert got["digest"] == weights and got["tokenizer_digest"] == tok and got["kind"] == "hf"

    # a run without an export: its newest checkpoint, said on stderr, and the run's tokenizer
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped, ignore=shutil.ignore_patterns("hf"))
    code, out, err = cli(capsys, "digest", stopped, "--json")
    assert code == 0 and "reading its newest checkpoint" in err
    got = json.loads(out)
    assert got["kind"] == "checkpoint" and got["step"] == 4
    assert got["digest"] == weights and got["tokenizer_digest"] == tok  # the same weights

    camelid.save(tiny(), tmp_path / "bare")  # weights alone: a digest, and no tokenizer
    code, out, _ = cli(capsys, "digest", tmp_path / "bare")
    assert code == 0 and "tokenizer  none (no tokenizer.json" in out


def test_digest_command_errors(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    config = camelid.ModelConfig.from_preset("tiny").to_hf("float32")
    (tmp_path / "config-only" / "config.json").write_text(json.dumps(config))
    for target, says in (
        (tmp_path / "nowhere", "no such directory"),
        (tmp_path / "empty", "not a model directory (no config.json"),
        (tmp_path / "config-only", "no model.safetensors or model.safetensors.index.json"),
    ):
        code, _, err = cli(capsys, "digest", target)
        assert code == 1 and err.startswith("camelid: error: ") and err.count("\n") == 1, err
        assert says in err and str(target) in err, err


# ----------------------------------------------------------------------------- model card
def card_parts(text: str) -> tuple[list[str], dict[str, list[list[str]]]]:
    """The card's headings and, under each, its table rows (cells), read by a Markdown parser."""
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    headings, tables, row, section = [], {}, None, None
    for i, t in enumerate(tokens):
        if t.type == "heading_open":
            section = tokens[i + 1].content
            headings.append(section)
        elif t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            tables.setdefault(section, []).append(row)
            row = None
    return headings, tables


def test_export_writes_a_model_card_with_the_digests(capsys, run, tmp_path):
    assert cli(capsys, "export", run, tmp_path / "out")[0] == 0
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert text == (run / "hf" / "README.md").read_text(encoding="utf-8")  # the trainer's too
    headings, tables = card_parts(text)
    assert headings[1:] == ["Model", "Parameters", "Digests", "Training data", "Evaluation"]
    got = digest_json(capsys, tmp_path / "out")
    digests = dict(tables["Digests"][1:])
    assert digests == {"weights": f"`{got['digest']}`", "tokenizer": f"`{got['tokenizer_digest']}`"}
    config = camelid.ModelConfig.from_hf_file(tmp_path / "out" / "config.json")
    model = dict(tables["Model"][1:])
    for key, value in (("dim", config.dim), ("layers", config.n_layers),
                       ("heads", config.n_heads), ("kv heads", config.n_kv_heads),
                       ("vocab", config.vocab_size), ("context", config.max_seq_len),
                       ("rope theta", f"{config.rope_theta:g}")):  # fmt: skip
        assert model[key] == str(value), key
    params = dict(tables["Parameters"][1:])
    assert f"({config.num_params():,})" in params["total"]
    assert f"({config.num_params(exclude_embedding=True):,})" in params["non-embedding"]
    manifest = json.loads((Path(load_recipe(run / "recipe.toml").data.dir) / "manifest.json")
                          .read_text())  # fmt: skip
    data = dict(tables["Training data"][1:])
    train_tokens = manifest["splits"]["train"]["tokens"]
    assert data["tokens"].startswith(f"{train_tokens:,} train")
    assert data["tokenized with"] == f"`{manifest['tokenizer']['digest']}`"
    assert data["sources"].startswith(f"{len(manifest['sources'])} files")
    assert "No evaluation results yet." in text
    meta = read_model_card(tmp_path / "out" / "README.md")
    assert meta["digest"] == got["digest"] and meta["data"]["tokens"]["train"] == train_tokens


def test_the_card_lists_evaluations():
    config = camelid.ModelConfig.from_preset("tiny")
    mine, other = "a" * 64, "b" * 64
    evaluations = [
        {"task": "hellaswag", "metric": "acc_norm", "value": 0.312345, "digest": mine,
         "date": "2025-06-01"},
        {"task": "hu|man", "metric": "pass@1", "value": 0.5, "digest": other, "date": "2025-06-02"},
    ]  # fmt: skip
    text = model_card(config, mine, None, evaluations=evaluations)
    _, tables = card_parts(text)
    header, *rows = tables["Evaluation"]
    assert header == ["task", "metric", "value", "weights digest", "date"]
    assert rows[0] == ["hellaswag", "acc_norm", "0.3123", f"`{mine[:16]}`", "2025-06-01"]
    assert rows[1][0] == "hu|man" and rows[1][3] == f"`{other[:16]}` (other weights)"
    assert dict(tables["Digests"][1:])["tokenizer"] == "none (no tokenizer)"
    assert "No evaluation results yet." not in text


def test_convert_refreshes_a_camelid_card_and_keeps_another(capsys, run, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(run / "hf", src)
    old = read_model_card(src / "README.md")
    evaluation = {"task": "t", "metric": "acc", "value": 0.5, "digest": old["digest"],
                  "date": "2025-06-01"}  # fmt: skip
    config = camelid.ModelConfig.from_hf_file(src / "config.json")
    card = model_card(config, old["digest"], old["tokenizer_digest"], old["data"], [evaluation])
    (src / "README.md").write_text(card, encoding="utf-8")
    assert cli(capsys, "convert", src, tmp_path / "bf16", "--dtype", "bfloat16")[0] == 0
    new = read_model_card(tmp_path / "bf16" / "README.md")
    got = digest_json(capsys, tmp_path / "bf16")
    assert new["digest"] == got["digest"] != old["digest"]
    assert new["tokenizer_digest"] == got["tokenizer_digest"] == old["tokenizer_digest"]
    assert new["data"] == old["data"] and new["evaluations"] == [evaluation]
    rows = card_parts((tmp_path / "bf16" / "README.md").read_text())[1]["Evaluation"]
    assert rows[1][3].endswith("(other weights)")  # measured on the float32 weights

    (src / "README.md").write_text("# Someone's model\n\nTheir license and notes.\n")
    code, _, err = cli(capsys, "convert", src, tmp_path / "kept")
    assert code == 0 and "not a camelid model card" in err
    assert (tmp_path / "kept" / "README.md").read_bytes() == (src / "README.md").read_bytes()
    (src / "README.md").unlink()
    assert cli(capsys, "convert", src, tmp_path / "fresh")[0] == 0
    fresh = read_model_card(tmp_path / "fresh" / "README.md")
    assert fresh["digest"] == directory_digest(tmp_path / "fresh") and fresh["data"] is None


def test_an_evaluated_run_exports_its_scores_in_the_card(capsys, run, tmp_path):
    """camelid eval RUN appends to RUN/eval-ledger.jsonl; camelid export RUN puts the scores
    measured on exactly the exported weights in the card's Evaluation table."""
    shutil.copytree(run, tmp_path / "run")
    runcopy = tmp_path / "run"
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"context": c, "choices": ["a b", "c d"], "gold": 0}) + "\n"
                            for c in ("one two", "three four", "five")))  # fmt: skip
    code, _, err = cli(capsys, "eval", runcopy, "--task", task, "--out", tmp_path / "r.json",
                       "-q", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert (runcopy / "eval-ledger.jsonl").exists()
    code, _, err = cli(capsys, "export", runcopy, tmp_path / "out")
    assert code == 0, err
    _, tables = card_parts((tmp_path / "out" / "README.md").read_text())
    _, *rows = tables["Evaluation"]
    digest = digest_json(capsys, tmp_path / "out")["digest"]
    assert {r[1] for r in rows} == {"acc", "acc_norm"}
    assert all(r[0] == "mc" and r[3] == f"`{digest[:16]}`" for r in rows)


def test_perplexity_on_the_runs_validation_split(capsys, run, dataset, tmp_path):  # noqa: F811
    """A prepared dataset directory is a perplexity task over its validation shards: every
    token but each shard's first is scored once; a dataset of another tokenizer is refused."""
    import numpy as np

    from camelid.eval import results

    out = tmp_path / "ppl.json"
    code, _, err = cli(capsys, "eval", run, "--task", dataset / "data", "--out", out,
                       "--no-ledger", "-q", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    r = results.read(out)
    manifest = json.loads((dataset / "data" / "manifest.json").read_text())
    shards = manifest["splits"]["validation"]["shards"]
    assert r["task"]["kind"] == "perplexity" and r["metrics"]["items"] == len(shards)
    assert r["metrics"]["tokens"] == sum(s["tokens"] - 1 for s in shards)
    m = r["metrics"]
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / (np.log(2) * m["bytes"]))
    assert 1 < m["perplexity"] < 600  # a trained tiny model on its own data: better than chance
    other = tmp_path / "other"
    shutil.copytree(dataset / "data", other)
    manifest["tokenizer"]["digest"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, "eval", run, "--task", other, "--no-ledger", "-q")
    assert code == 1 and "tokenized with tokenizer 000000000000" in err
