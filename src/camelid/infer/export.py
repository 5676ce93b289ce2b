"""Complete Hugging Face directories: a model and its tokenizer, as the ecosystem expects them.

    save_pretrained(model, tokenizer, "out/")          # the trainer's export does this
    export_checkpoint("runs/quickstart", "out/")       # camelid export: any training checkpoint
    convert("Llama-3.2-1B", "out/", dtype=torch.bfloat16)   # camelid convert
    export_gguf("runs/quickstart", "model.gguf", dtype="q8_0")   # one file for llama.cpp

A complete directory holds the weights (safetensors), ``config.json`` with ``bos_token_id`` and
``eos_token_id``, ``generation_config.json`` listing every id camelid's engine stops on (end of
text, end of turn, end of message: :func:`camelid.infer.engine.default_stop_ids`), so
``transformers``' ``generate`` stops where camelid stops, the tokenizer files, and a
``README.md`` model card (:func:`model_card`): the architecture, parameter counts, the data a
run was trained on, the weights and tokenizer digests, evaluation results. This room may read
both the weights and the tokenizer, so the directory is assembled here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from camelid.config import ModelConfig
from camelid.errors import CamelidError, CheckpointError
from camelid.infer.engine import default_stop_ids
from camelid.infer.load import (
    RUN_TOKENIZER,
    ModelSource,
    inspect_model,
    is_run,
    load_model,
    load_tokenizer,
    resolve_model,
    run_dataset,
    run_tokenizer,
    training_checkpoint,
)
from camelid.io import copy_file_atomic, format_bytes, format_count, write_text_atomic
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.tokenizer import CONFIG_NAME, JSON_NAME, MODEL_NAME, SPECIAL_TOKENS_NAME
from camelid.weights import checkpoint as ckpt
from camelid.weights import gguf, hf
from camelid.weights.digest import directory_digest

CARD_NAME = "README.md"  # the model card, where the Hugging Face Hub looks for one
_CARD_KEY = "camelid"  # the card's front-matter key holding what it was made from

# What a Hugging Face model directory carries besides weights and config.json, kept by convert.
TOKENIZER_FILES = (
    JSON_NAME,
    MODEL_NAME,
    CONFIG_NAME,
    SPECIAL_TOKENS_NAME,
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class Written:
    """What an export or a conversion wrote, read back from the directory itself."""

    source: ModelSource
    out: Path
    info: hf.CheckpointInfo
    tokenizer: str | None  # where the tokenizer came from (None: the source had none)
    seconds: float


def save_pretrained(
    model: Transformer,
    tokenizer: Tokenizer,
    out: str | Path,
    max_shard_size: int | str = "5GB",
    *,
    data: dict[str, Any] | None = None,
    evaluations: list[dict[str, Any]] | None = None,
) -> None:
    """Write ``model`` and ``tokenizer`` as one complete Hugging Face directory (see the module
    docstring), with a model card whose digests are read back from the files written;
    ``data`` (:func:`data_summary`) and ``evaluations`` go into the card. Each file is written
    atomically."""
    out = Path(out)
    hf.save(model, out, max_shard_size, bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id, stop_token_ids=default_stop_ids(tokenizer))  # fmt: skip
    tokenizer.save(out, model_max_length=model.config.max_seq_len)
    for name in (MODEL_NAME, "chat_template.jinja", "chat_template.json"):
        # From an earlier directory in the same place: they would describe another tokenizer.
        (out / name).unlink(missing_ok=True)
    card = model_card(model.config, directory_digest(out), tokenizer.digest, data, evaluations)
    write_text_atomic(out / CARD_NAME, card)


def keep_run_tokenizer(tokenizer: Tokenizer, run_dir: str | Path) -> None:
    """The run's own copy of its tokenizer (``RUN/tokenizer``): the run's checkpoints can be
    exported with it even after the original moves or is retrained."""
    tokenizer.save(Path(run_dir) / RUN_TOKENIZER)


def export_checkpoint(
    run_or_checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    evaluations: list[dict[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> Written:
    """A training run (its newest complete checkpoint) or one checkpoint → a complete Hugging
    Face directory ``out`` (``evaluations``: rows for its model card; those of other weights
    are only counted). The run is only read. Everything is checked — the checkpoint's
    index, its tokenizer, ``out`` — before ``out`` is written; a new ``out`` is written beside
    it under a temporary name and renamed when complete."""
    t0 = time.perf_counter()
    path = training_checkpoint(run_or_checkpoint)
    run = ckpt.run_of(path)
    step = ckpt.step_of(path)
    source = ModelSource(Path(run_or_checkpoint), path, "checkpoint", run=run, step=step)
    out = Path(out)
    _check_out(out, overwrite, path)
    if run is None:
        raise CheckpointError(
            f"{path}: a checkpoint outside a run (RUN/{ckpt.CHECKPOINTS}/step-N): the tokenizer "
            "it was trained with cannot be found"
        )
    tok_path = run_tokenizer(run)
    tokenizer = Tokenizer.load(tok_path)
    try:
        info = ckpt.inspect_checkpoint(path)
        if tokenizer.vocab_size > info.config.vocab_size:
            raise CheckpointError(
                f"{tok_path} has {tokenizer.vocab_size} ids but {path}'s model has "
                f"{info.config.vocab_size}: not the tokenizer it was trained with"
            )
        model = ckpt.load(path, dtype=dtype or info.dtype)
    except CheckpointError as e:
        older = [p for p in ckpt.list_checkpoints(run) if p.name < path.name]
        if path == Path(run_or_checkpoint) or not older:
            raise
        # a damaged newest checkpoint: say so, and which one to export instead (never silently)
        hint = f"camelid export {shlex.quote(str(older[-1]))} {shlex.quote(str(out))}"
        raise CheckpointError(f"{e}; to export the one before it: {hint}") from None
    if log is not None:  # only now: a bad checkpoint ends in its one error line
        log(f"read {path} (step {step}); writing {out} with the tokenizer {tok_path}")
    data = run_data(run)
    _write(out, lambda d: save_pretrained(model, tokenizer, d, max_shard_size, data=data,
                                          evaluations=evaluations))  # fmt: skip
    return Written(source, out, hf.inspect_checkpoint(out), str(tok_path),
                   time.perf_counter() - t0)  # fmt: skip


def export_merged(
    model: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Written:
    """MODEL (a Hugging Face directory, a run or a checkpoint, with its tokenizer) with the
    LoRA adapter ``adapter`` merged in → a complete Hugging Face directory ``out`` of full
    weights, in MODEL's dtype unless ``dtype``. The merge is computed in float32 whatever
    the dtypes; the adapter is checked against MODEL (shapes, recorded base digest) before
    ``out`` is written, and a new ``out`` appears only when complete."""
    from camelid.model.lora import merge_lora
    from camelid.weights.lora import load_adapter

    t0 = time.perf_counter()
    source = resolve_model(model)
    out = Path(out)
    info = inspect_model(source)
    _check_out(out, overwrite, source.path)
    if log is not None and source.note is not None:
        log(source.note)
    tokenizer = load_tokenizer(source)
    if Path(adapter).resolve() in (out.resolve(), *out.resolve().parents):
        raise CheckpointError(f"{out}: would write over the adapter {adapter}; name another")
    weights = load_model(source, dtype=torch.float32)  # merged in fp32, then cast
    weights = load_adapter(weights, adapter, base_name=str(source.given))
    config = weights.lora_config
    merged = merge_lora(weights).to(dtype or info.dtype)
    if log is not None:
        log(
            f"merged the LoRA adapter {adapter} (r {config.r}, alpha {config.alpha:g}, "
            f"{', '.join(config.target_modules)}) into {source.given}; writing {out}"
        )
    data = run_data(source.run) if source.run is not None else None
    _write(out, lambda d: save_pretrained(merged, tokenizer, d, max_shard_size, data=data))
    return Written(source, out, hf.inspect_checkpoint(out), tokenizer.source,
                   time.perf_counter() - t0)  # fmt: skip


def convert(
    model: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    log: Callable[[str], None] | None = None,
) -> Written:
    """Re-save MODEL (a Hugging Face directory, a run or a checkpoint) as a Hugging Face
    directory ``out``, optionally cast, keeping what makes it complete: the tokenizer files,
    generation_config.json, and config.json's token ids (or the tokenizer's, if it has none).
    Every tensor is checked before ``out`` is written."""
    t0 = time.perf_counter()
    source = resolve_model(model, need_tokenizer=False)
    out = Path(out)
    info = inspect_model(source)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.resolve() == source.path.resolve():
        raise CheckpointError(
            f"{out}: is the directory being converted ({source.path}); name another one"
        )
    _check_not_in_a_run(out)
    if log is not None and source.note is not None:
        log(source.note)
    if source.kind in ("checkpoint", "gguf"):
        tokenizer = load_tokenizer(source)
        weights = load_model(source, dtype=dtype or info.dtype)
        data = run_data(source.run) if source.run is not None else None
        save_pretrained(weights, tokenizer, out, max_shard_size, data=data)
        origin = tokenizer.source
    else:
        origin = _convert_hf(source.path, out, info, dtype, max_shard_size, log)
    return Written(source, out, hf.inspect_checkpoint(out), origin, time.perf_counter() - t0)


@dataclass(frozen=True)
class WrittenGGUF:
    """What :func:`export_gguf` wrote."""

    source: ModelSource
    saved: gguf.Saved
    config: ModelConfig
    seconds: float


def gguf_dtype_of(source: ModelSource) -> str:
    """The GGUF type a model is written in when none is asked for: a GGUF file's own (F16 or
    Q8_0), else f32, the exact one."""
    if source.kind == "gguf":
        return {"F16": "f16", "Q8_0": "q8_0"}.get(gguf.inspect(source.path).file_type, "f32")
    return "f32"


def export_gguf(
    model: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    adapter: str | Path | None = None,
    overwrite: bool = False,
    check_tokenizer: bool = True,
    log: Callable[[str], None] | None = None,
) -> WrittenGGUF:
    """MODEL (a Hugging Face directory, a run, a checkpoint or a GGUF file, with its
    tokenizer; ``adapter``: a LoRA adapter merged in first) → one GGUF file ``out`` for
    llama.cpp, in ``dtype`` (f32, f16 or q8_0, or one of llama.cpp's quantiser's
    :data:`~camelid.weights.gguf.LLAMACPP_DTYPES`; default :func:`gguf_dtype_of`). The model and
    the tokenizer are checked (llama.cpp's tokenisation included) before anything is written,
    and ``out`` appears only when complete."""
    t0 = time.perf_counter()
    source = resolve_model(model)
    out = Path(out)
    dtype = dtype or gguf_dtype_of(source)
    if dtype not in gguf.WRITE_TYPES:
        kinds = ", ".join(gguf.WRITE_TYPES)
        raise CheckpointError(f"--dtype {dtype}: GGUF is written as one of {kinds}")
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; a GGUF export is one file (OUT.gguf)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: exists (--overwrite replaces it)")
    if source.kind == "gguf" and out.resolve() == source.path.resolve():
        raise CheckpointError(f"{out}: is the file being exported; name another one")
    info = inspect_model(source)
    gguf.check_exportable(info.config)
    if log is not None and source.note is not None:
        log(source.note)
    tokenizer = load_tokenizer(source)
    # The stored dtype (half precision stays half in memory: each tensor is widened to fp32 only
    # as it is written, exactly); fp32 where an adapter is merged in.
    weights = load_model(source, dtype=torch.float32 if adapter is not None else info.dtype)
    if adapter is not None:
        from camelid.infer.load import merge_adapter

        weights = merge_adapter(weights, adapter, source, log)
    saved = gguf.save(weights, tokenizer, out, dtype, check=check_tokenizer, log=log)
    return WrittenGGUF(source, saved, weights.config, time.perf_counter() - t0)


def _convert_hf(
    src: Path,
    out: Path,
    info: hf.CheckpointInfo,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    log: Callable[[str], None] | None,
) -> str | None:
    tokenizer = Tokenizer.load(src) if _has_any(src, (JSON_NAME, MODEL_NAME)) else None
    ids = _token_ids(src / hf.CONFIG_NAME)
    if tokenizer is not None:
        ids.setdefault("bos_token_id", tokenizer.bos_id)
        ids.setdefault("eos_token_id", tokenizer.eos_id)
    has_generation = (src / hf.GENERATION_CONFIG_NAME).is_file()
    stops = default_stop_ids(tokenizer) if tokenizer is not None and not has_generation else None
    weights = hf.load(src, dtype=dtype or info.dtype)
    hf.save(weights, out, max_shard_size, stop_token_ids=stops, **ids)
    same = out.resolve() == src.resolve()
    for name in (*TOKENIZER_FILES, hf.GENERATION_CONFIG_NAME):
        if (src / name).is_file() and not same:
            copy_file_atomic(src / name, out / name)
    _convert_card(src, out, info.config, tokenizer, log)
    if tokenizer is None and log is not None:
        log(f"note: {src} has no {JSON_NAME} or {MODEL_NAME}; {out} holds the weights only")
    return str(src) if tokenizer is not None else None


def _convert_card(
    src: Path,
    out: Path,
    config: ModelConfig,
    tokenizer: Tokenizer | None,
    log: Callable[[str], None] | None,
) -> None:
    """The converted directory's model card: a camelid card of the source refreshed (new
    digests; its data and evaluations kept), another card kept as it is (the publisher's
    text), else a new one."""
    card = src / CARD_NAME
    recorded = read_model_card(card)
    if recorded is None and card.is_file():
        copy_file_atomic(card, out / CARD_NAME)
        if log is not None:
            log(f"note: kept {card} as it is (not a camelid model card: no digests added)")
        return
    recorded = recorded or {}
    text = model_card(config, directory_digest(out), tokenizer.digest if tokenizer else None,
                      recorded.get("data"), recorded.get("evaluations"))  # fmt: skip
    write_text_atomic(out / CARD_NAME, text)


def _token_ids(config_file: Path) -> dict[str, int | list[int]]:
    """bos_token_id / eos_token_id of a source config.json, where they are ids."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, int | list[int]] = {}
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key) if isinstance(config, dict) else None
        ids = value if isinstance(value, list) else [value]
        if ids and all(type(v) is int for v in ids):  # not bool, not float
            out[key] = value
    return out


def _has_any(path: Path, names: tuple[str, ...]) -> bool:
    return any((path / n).is_file() for n in names)


def _check_out(out: Path, overwrite: bool, checkpoint: Path) -> None:
    """``out`` must be new or an empty directory, or ``overwrite`` given; never the checkpoint
    being read, inside it, or above it (the run itself, its checkpoints/)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is a file; name a directory")
    real, source = out.resolve(), checkpoint.resolve()
    if real == source or source in real.parents or real in source.parents:
        raise CheckpointError(
            f"{out}: would write into or over the checkpoint {checkpoint} being exported; "
            "name a directory outside it (RUN/hf is fine)"
        )
    _check_not_in_a_run(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out}: exists and is not empty; pass --overwrite to replace its model files"
        )


def _check_not_in_a_run(out: Path) -> None:
    """A model directory is never written over a training run or among its checkpoints: the
    run would stop resolving as a run, or its checkpoints would hold a stranger."""
    real = out.resolve()
    if is_run(real):
        raise CheckpointError(
            f"{out}: is a training run; name a directory outside it (RUN/hf is fine)"
        )
    for parent in (real, *real.parents):
        if parent.name == ckpt.CHECKPOINTS and is_run(parent.parent):
            raise CheckpointError(
                f"{out}: is inside the checkpoints of the run {parent.parent}; name a directory "
                "outside them (RUN/hf is fine)"
            )


def _write(out: Path, write: Callable[[Path], None]) -> None:
    """Write a directory: in place over an existing one, else under a temporary name beside
    it, renamed when complete, so a killed export leaves no directory that looks whole."""
    if out.exists():
        write(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        write(stage)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------- model card
def run_data(run: Path) -> dict[str, Any] | None:
    """The :func:`data_summary` of the dataset a run's recipe names (None where it cannot be
    read: moved, or never recorded)."""
    found = run_dataset(run)
    return None if found is None else data_summary(found[1], found[0])


def data_summary(manifest: dict[str, Any], data_dir: str | Path) -> dict[str, Any]:
    """What a model card says of a training dataset, from its manifest.json (``camelid
    prepare``): tokens and documents per split, the source files, the tokenizer digest."""

    def table(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    splits = {name: table(split) for name, split in table(manifest.get("splits")).items()}
    sources = [s for s in manifest.get("sources") or [] if isinstance(s, dict)]
    corpus = table(table(manifest.get("recipe")).get("config")).get("corpus") or []
    return {
        "dir": str(Path(data_dir)),
        "tokens": {name: split.get("tokens") for name, split in splits.items()},
        "documents": {name: split.get("documents") for name, split in splits.items()},
        "sources": {
            "files": len(sources),
            "bytes": sum(s.get("bytes") or 0 for s in sources),
            "corpus": [str(c) for c in corpus],
        },
        "tokenizer_digest": table(manifest.get("tokenizer")).get("digest"),
        "recipe_digest": manifest.get("recipe_digest"),
    }


def model_card(
    config: ModelConfig,
    weights_digest: str,
    tokenizer_digest: str | None,
    data: dict[str, Any] | None = None,
    evaluations: list[dict[str, Any]] | None = None,
) -> str:
    """A model card (``README.md``, Markdown with Hugging Face front matter): the architecture,
    parameter counts, training data (:func:`data_summary`, when known), the weights digest
    (:mod:`camelid.weights.digest`) and the tokenizer digest, and evaluation results, each a
    dict with ``task``, ``metric``, ``value``, ``digest`` (of the weights it was measured on)
    and ``date``. The front matter also holds these inputs as JSON, so ``camelid convert``
    can refresh the card."""
    c = config
    meta = {"digest": weights_digest, "tokenizer_digest": tokenizer_digest,
            "data": data, "evaluations": list(evaluations or [])}  # fmt: skip
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- llama",
        "- camelid",
        # JSON is YAML: one ASCII line that read_model_card finds again
        f"{_CARD_KEY}: {json.dumps(meta, sort_keys=True, default=str)}",
        "---",
        "",
        f"# {c.name or 'Llama model'}",
        "",
        "A Llama-architecture language model in the Hugging Face format, written by camelid. "
        f"It loads in `transformers` (`{_architecture(c)}`) and in camelid.",
        *_moe_note(c),
        "",
        "## Model",
        "",
        *_table(("setting", "value"), [
            ("dim", c.dim),
            ("layers", c.n_layers),
            ("heads", c.n_heads),
            ("kv heads", c.n_kv_heads),
            ("head dim", c.head_dim),
            ("ffn hidden", c.ffn_hidden_dim),
            ("vocab", c.vocab_size),
            ("context", c.max_seq_len),
            ("rope theta", f"{c.rope_theta:g}"),
            ("rope scaling", _rope_scaling(c)),
            ("output head", "tied to the embedding" if c.tie_embeddings else "untied"),
            *_moe_rows(c),
        ]),
        "",
        "## Parameters",
        "",
        *_table(("count", "parameters"), [
            ("total", _count(c.num_params())),
            ("non-embedding", _count(c.num_params(exclude_embedding=True))),
            *([("active per token", _count(c.num_params(active=True)))] if c.is_moe else []),
        ]),
        "",
        "## Digests",
        "",
        *_table(("what", "sha256"), [
            ("weights", f"`{weights_digest}`"),
            ("tokenizer", f"`{tokenizer_digest}`" if tokenizer_digest else "none (no tokenizer)"),
        ]),
        "",
        "The weights digest hashes every tensor (name, dtype, shape, bytes), not the files: "
        "re-sharding or re-saving keeps it, any changed weight or dtype changes it. "
        "`camelid digest DIR` recomputes both; a camelid server reports them in `/v1/models`.",
        "",
        "## Training data",
        "",
        *_data_section(data),
        "",
        "## Evaluation",
        "",
        *_evaluation_section(weights_digest, evaluations),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def read_model_card(path: str | Path) -> dict[str, Any] | None:
    """What a camelid model card was made from (digests, data, evaluations), from its front
    matter; None for a missing file or a card camelid did not write."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---\n"):
        return None
    for line in text[4:].split("\n---\n", 1)[0].splitlines():
        if line.startswith(f"{_CARD_KEY}: "):
            try:
                meta = json.loads(line[len(_CARD_KEY) + 2 :])
            except json.JSONDecodeError:
                return None
            return meta if isinstance(meta, dict) else None
    return None


def _architecture(c: ModelConfig) -> str:
    try:
        return c.to_hf()["architectures"][0]
    except CamelidError:  # an MoE shape with no HF form: hf.save refuses it before this
        return "no Hugging Face class"


def _moe_rows(c: ModelConfig) -> list[tuple[str, Any]]:
    if not c.is_moe:
        return []
    return [
        ("experts", f"{c.n_experts} routed (top-{c.n_experts_per_tok}, {c.router_scoring}) + "
                    f"{c.n_shared_experts} shared, width {c.moe_ffn_dim}"),
        ("MoE layers", f"{c.n_moe_layers} of {c.n_layers} (every {c.moe_interleave_step})"),
    ]  # fmt: skip


def _moe_note(c: ModelConfig) -> list[str]:
    if not c.is_moe:
        return []
    return [
        "",
        "If balancing moved its experts' selection biases in training, they are saved as "
        "`model.layers.N.feed_forward.router.selection_bias`: camelid routes with them; "
        "`transformers` ignores them (it warns of unused weights), so its routing, and its "
        "outputs, then differ from camelid's.",
    ]


def _rope_scaling(c: ModelConfig) -> str:
    s = c.rope_scaling
    if s is None:
        return "none"
    return (
        f"llama3: factor {s.factor:g}, low {s.low_freq_factor:g}, high {s.high_freq_factor:g}, "
        f"original context {s.original_max_position_embeddings}"
    )


def _count(n: int) -> str:
    return f"{format_count(n)} ({n:,})"


def _data_section(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return ["Not recorded: this directory was not exported from a camelid training run "
                "whose dataset could be read."]  # fmt: skip

    def per_split(counts: Any) -> str:
        items = counts.items() if isinstance(counts, dict) else []
        return ", ".join(f"{v:,} {k}" if isinstance(v, int) else f"{v} {k}" for k, v in items)

    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    corpus = ", ".join(f"`{c}`" for c in sources.get("corpus") or []) or "not recorded"
    files = sources.get("files")
    nbytes = sources.get("bytes")
    size = f", {format_bytes(nbytes)}" if isinstance(nbytes, int | float) else ""
    tok = data.get("tokenizer_digest")
    return _table(("what", "value"), [
        ("dataset", f"`{data.get('dir')}`"),
        ("tokens", per_split(data.get("tokens")) or "not recorded"),
        ("documents", per_split(data.get("documents")) or "not recorded"),
        ("sources", f"{files} files{size}" if files is not None else "not recorded"),
        ("corpus", corpus),
        ("tokenized with", f"`{tok}`" if tok else "not recorded"),
        ("dataset recipe", f"`{data.get('recipe_digest')}`"),
    ])  # fmt: skip


def _evaluation_section(weights_digest: str, evaluations: list[dict[str, Any]] | None) -> list[str]:
    if not evaluations:
        return ["No evaluation results yet."]
    rows, other = [], False
    for e in evaluations:
        value = e.get("value")
        digest = str(e.get("digest") or "")
        same = digest == weights_digest
        other |= not same
        rows.append((
            e.get("task"), e.get("metric"),
            f"{value:.4g}" if isinstance(value, float) else value,
            f"`{digest[:16]}`" + ("" if same else " (other weights)"), e.get("date"),
        ))  # fmt: skip
    lines = _table(("task", "metric", "value", "weights digest", "date"), rows)
    if other:
        lines += ["", "Results marked *other weights* were measured on weights whose digest "
                  "differs from this directory's: they do not describe these weights."]  # fmt: skip
    return lines


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    """A Markdown (GFM) table; ``|`` and line breaks in cells are escaped."""

    def cell(value: Any) -> str:
        return " ".join(str("" if value is None else value).split()).replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out
