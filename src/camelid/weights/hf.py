"""Hugging Face Llama checkpoints in and out (config.json + safetensors, single or sharded).

The one place that knows how camelid's parameter names and layout map to Hugging Face's:
:func:`hf_layout`. Loading streams tensors through safetensors' memory mapping straight into
the model's parameters, re-opening the mapping every 16 MiB copied so the pages already copied
stop counting against the process: peak memory stays near the size of the model itself.

Llama 4 (``Llama4ForCausalLM``, and the text part of ``Llama4ForConditionalGeneration``) is
mapped here too: its experts are stored fused as camelid holds them, but HF keeps Meta's
interleaved RoPE pairs in q/k, so those rows are permuted to camelid's half layout on load and
back on save (:attr:`Piece.rope_heads`).
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid.config import ModelConfig
from camelid.errors import CheckpointError, ConfigError
from camelid.io import atomic_path, parse_size, write_text_atomic
from camelid.model import Transformer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Tensors some published checkpoints carry that hold no learned weights.
_IGNORED_RE = re.compile(r"(language_model\.)?model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# Llama4ForConditionalGeneration: the language model's tensors carry this prefix; the vision
# tower and its projector (the other tensors) are not part of a camelid model and are skipped.
MULTIMODAL_PREFIX = "language_model."
_VISION_RE = re.compile(r"(vision_model|multi_modal_projector)\..*")
# camelid's own tensor, not part of HF's Llama 4: an MoE layer's selection bias, saved when
# balancing moved it (fp32, [E]); transformers ignores it (it warns of an unused weight).
_SELECTION_BIAS = "model.layers.{}.feed_forward.router.selection_bias"
_SELECTION_BIAS_RE = re.compile(
    r"(?:language_model\.)?model\.layers\.(\d+)\.feed_forward\.router\.selection_bias"
)
# Bytes copied out of one memory mapping before it is re-opened (see module docstring).
_REMAP_BYTES = 16 * 2**20

# safetensors' dtype names, as its headers spell them.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The ones a model's weights may be stored in.
_SAFETENSORS_FLOATS = {k: SAFETENSORS_DTYPES[k] for k in ("F32", "F16", "BF16", "F64")}


@dataclass(frozen=True)
class Piece:
    """One HF tensor that fills rows ``[start, start + shape[0])`` of a camelid parameter."""

    hf_name: str
    start: int
    shape: tuple[int, ...]
    # > 0: HF stores these rows per head in Meta's interleaved RoPE order (pairs 2i, 2i+1) for
    # this many heads; camelid holds them in halves (i, i + head_dim/2). Llama 4's q and k.
    rope_heads: int = 0


def from_hf_rows(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A tensor as HF stores it → as camelid holds it (q/k rows of Llama 4 permuted)."""
    if not piece.rope_heads:
        return tensor
    h = piece.rope_heads
    return tensor.view(h, -1, 2, tensor.shape[-1]).transpose(1, 2).reshape(tensor.shape)


def to_hf_rows(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The inverse of :func:`from_hf_rows`."""
    if not piece.rope_heads:
        return tensor
    h = piece.rope_heads
    return tensor.view(h, 2, -1, tensor.shape[-1]).transpose(1, 2).reshape(tensor.shape)


def hf_layout(config: ModelConfig, prefix: str = "") -> dict[str, list[Piece]]:
    """camelid parameter name → the HF tensors stacked (along dim 0) to form it, in HF order.

    The tied output head is absent: it is the embedding. The fused ``wqkv`` is the
    row-wise concatenation of HF's q, k and v projections. ``prefix`` is put before every HF
    name (:data:`MULTIMODAL_PREFIX` for the text part of a multimodal Llama 4 checkpoint).
    """
    layout = _llama4_layout(config) if config.is_hf_llama4 else _llama_layout(config)
    if prefix:
        layout = {
            name: [Piece(prefix + p.hf_name, p.start, p.shape, p.rope_heads) for p in pieces]
            for name, pieces in layout.items()
        }
    return layout


def _stack(
    hf_names: list[str], rows: list[int], cols: int | None, rope_heads: list[int] | None = None
) -> list[Piece]:
    pieces, start = [], 0
    heads = rope_heads or [0] * len(hf_names)
    for name, r, h in zip(hf_names, rows, heads, strict=True):
        pieces.append(Piece(name, start, (r,) if cols is None else (r, cols), h))
        start += r
    return pieces


def _llama4_layout(config: ModelConfig) -> dict[str, list[Piece]]:
    """``Llama4ForCausalLM``: dense layers' ``feed_forward`` is a SwiGLU, MoE layers' holds
    the router, the fused experts (``gate_up_proj`` [E, dim, 2F], ``down_proj`` [E, F, dim],
    stored [in, out] exactly as camelid's ``w13``/``w2``) and the one shared expert. QK-norm
    has no weights."""
    try:
        config.to_hf()  # the one statement of which MoE shapes HF's Llama 4 can express
    except ConfigError as e:
        raise CheckpointError(f"no Hugging Face weight layout: {e}") from None
    d, hd, ffn = config.dim, config.head_dim, config.ffn_hidden_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    E, moe_ffn = config.n_experts, config.moe_ffn_dim or 0
    layout: dict[str, list[Piece]] = {
        "tok_embeddings.weight": _stack(["model.embed_tokens.weight"], [config.vocab_size], d)
    }
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        attn = hf + "self_attn."
        layout[ours + "attention_norm.weight"] = _stack([hf + "input_layernorm.weight"], [d], None)
        layout[ours + "attention.wqkv.weight"] = _stack(
            [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"],
            [q, kv, kv], d, [config.n_heads, config.n_kv_heads, 0],
        )  # fmt: skip
        layout[ours + "attention.wo.weight"] = _stack([attn + "o_proj.weight"], [d], q)
        layout[ours + "ffn_norm.weight"] = _stack(
            [hf + "post_attention_layernorm.weight"], [d], None
        )
        ff, mine = hf + "feed_forward.", ours + "feed_forward."
        if config.is_moe_layer(i):
            layout[mine + "router.weight"] = _stack([ff + "router.weight"], [E], d)
            layout[mine + "experts.w13"] = [
                Piece(ff + "experts.gate_up_proj", 0, (E, d, 2 * moe_ffn))
            ]
            layout[mine + "experts.w2"] = [Piece(ff + "experts.down_proj", 0, (E, moe_ffn, d))]
            sh, ffn_i = ff + "shared_expert.", moe_ffn
            mine = mine + "shared."
        else:
            sh, ffn_i = ff, ffn
        layout[mine + "w1.weight"] = _stack([sh + "gate_proj.weight"], [ffn_i], d)
        layout[mine + "w3.weight"] = _stack([sh + "up_proj.weight"], [ffn_i], d)
        layout[mine + "w2.weight"] = _stack([sh + "down_proj.weight"], [d], ffn_i)
    layout["norm.weight"] = _stack(["model.norm.weight"], [d], None)
    if not config.tie_embeddings:
        layout["output.weight"] = _stack(["lm_head.weight"], [config.vocab_size], d)
    return layout


def _llama_layout(config: ModelConfig) -> dict[str, list[Piece]]:
    """``LlamaForCausalLM``."""
    d, hd, ffn = config.dim, config.head_dim, config.ffn_hidden_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd

    layout: dict[str, list[Piece]] = {
        "tok_embeddings.weight": _stack(["model.embed_tokens.weight"], [config.vocab_size], d)
    }
    # (camelid module, the HF modules stacked into it, their output rows, input columns, bias?)
    # in HF's order; norms have a weight vector only.
    per_layer = [
        ("attention_norm", ["input_layernorm"], [d], None, False),
        ("attention.wqkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         [q, kv, kv], d, config.attention_bias),
        ("attention.wo", ["self_attn.o_proj"], [d], q, config.attention_bias),
        ("ffn_norm", ["post_attention_layernorm"], [d], None, False),
        ("feed_forward.w1", ["mlp.gate_proj"], [ffn], d, config.mlp_bias),
        ("feed_forward.w3", ["mlp.up_proj"], [ffn], d, config.mlp_bias),
        ("feed_forward.w2", ["mlp.down_proj"], [d], ffn, config.mlp_bias),
    ]  # fmt: skip
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for name, hf_names, rows, cols, bias in per_layer:
            layout[f"{ours}{name}.weight"] = _stack(
                [hf + n + ".weight" for n in hf_names], rows, cols
            )
            if bias:
                layout[f"{ours}{name}.bias"] = _stack(
                    [hf + n + ".bias" for n in hf_names], rows, None
                )
    layout["norm.weight"] = _stack(["model.norm.weight"], [d], None)
    if not config.tie_embeddings:
        layout["output.weight"] = _stack(["lm_head.weight"], [config.vocab_size], d)
    return layout


# ------------------------------------------------------------------------------------- load
def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> Transformer:
    """Load a Hugging Face Llama directory into a :class:`Transformer`: ``LlamaForCausalLM``,
    ``Llama4ForCausalLM``, or the language model of a ``Llama4ForConditionalGeneration``
    (its vision tower is skipped).

    ``dtype=None`` keeps the checkpoint's dtype, except that half-precision weights are upcast
    to float32 on the CPU, where bf16/fp16 matmuls are emulated and slow. ``progress=None``
    shows a progress bar when stderr is a terminal.
    """
    path = Path(path)
    config, layout, by_file, stored = _plan(path)
    targets = {p.hf_name: (name, p) for name, pieces in layout.items() for p in pieces}
    device = torch.device(device)
    model = Transformer.empty(config, device, load_dtype(dtype, stored, device))
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    bar = progress_bar(len(targets), f"loading {path.name}", progress)
    with torch.no_grad():
        for file, names in by_file.items():
            for hf_name, tensor in _stream(file, names):
                name, piece = targets[hf_name]
                rows = params[name][piece.start : piece.start + piece.shape[0]]
                rows.copy_(from_hf_rows(tensor, piece))
                bar.update(1)
    bar.close()
    return model


def load_dtype(asked: torch.dtype | None, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype weights are loaded in: the one asked for, else the stored one, except that
    half precision is upcast to float32 on the CPU (where bf16/fp16 matmuls are emulated)."""
    if asked is not None:
        return asked
    if device.type == "cpu" and stored in (torch.float16, torch.bfloat16):
        return torch.float32
    return stored


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` learns from config.json and the safetensors headers."""

    config: ModelConfig
    files: list[Path]
    dtype: torch.dtype
    nbytes: int
    stored: str = ""  # how the weights are stored when not as dtype: "GGUF Q8_0", ...


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate a checkpoint directory from its headers alone (no tensor data is read)."""
    path = Path(path)
    config, _, by_file, dtype = _plan(path)
    files = sorted(by_file)
    return CheckpointInfo(config, files, dtype, sum(f.stat().st_size for f in files))


def model_tensors(path: str | Path) -> dict[str, Path]:
    """HF name → the safetensors file holding it, for every tensor the model is made of (what
    :func:`load` reads), checked from the headers alone. Tensors a checkpoint may also carry
    that no model reads (rotary ``inv_freq`` buffers, a tied model's ``lm_head.weight``) are
    not among them."""
    _, _, by_file, _ = _plan(Path(path))
    return {name: file for file, names in by_file.items() for name in names}


def _plan(
    path: Path,
) -> tuple[ModelConfig, dict[str, list[Piece]], dict[Path, list[str]], torch.dtype]:
    """Read and check everything but the tensor data: config, names, shapes and dtypes.

    Returns the config, the layout, the HF tensor names to read from each file, and the
    checkpoint's dtype.
    """
    config = read_config(path)
    prefix = _tensor_prefix(path)
    layout = hf_layout(config, prefix)
    files = _tensor_files(path)
    layout.update(_selection_bias_layout(config, files, prefix))
    where = _check_names(path, files, layout, config, prefix)
    targets = {p.hf_name: p for pieces in layout.values() for p in pieces}
    by_file: dict[Path, list[str]] = {}
    for hf_name in targets:
        by_file.setdefault(where[hf_name], []).append(hf_name)
    return config, layout, by_file, _check_headers(by_file, targets)


def _selection_bias_layout(
    config: ModelConfig, files: dict[str, Path], prefix: str
) -> dict[str, list[Piece]]:
    """The selection biases a checkpoint holds (camelid's exports of balanced MoE training);
    one on a layer without experts stays unknown, and :func:`_check_names` names it."""
    layout = {}
    for name in files:
        match = _SELECTION_BIAS_RE.fullmatch(name)
        if match and name.startswith(prefix) and config.is_moe_layer(int(match.group(1))):
            layer = int(match.group(1))
            layout[f"layers.{layer}.feed_forward.selection_bias"] = [
                Piece(name, 0, (config.n_experts,))
            ]
    return layout


def read_config(path: Path) -> ModelConfig:
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    return ModelConfig.from_hf_file(path / CONFIG_NAME)


def _tensor_prefix(path: Path) -> str:
    """What the language model's tensor names start with: :data:`MULTIMODAL_PREFIX` for a
    multimodal Llama 4 config.json (one with a ``text_config``, already checked to be valid
    by :func:`read_config`), else nothing."""
    hf = json.loads((path / CONFIG_NAME).read_text())
    if hf.get("model_type") == "llama4" and isinstance(hf.get("text_config"), dict):
        return MULTIMODAL_PREFIX
    return ""


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name → the safetensors file that holds it."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: path / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        for file in sorted(set(files.values())):
            if not file.exists():
                raise CheckpointError(f"{index}: lists {file.name}, which does not exist")
        return files  # that each shard holds what the index says is checked with its header
    single = path / SINGLE_NAME
    if single.exists():
        return {name: single for name in _header_names(single)}
    other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
    hint = f" (found {', '.join(other)}: only safetensors is supported)" if other else ""
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")


def _header_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _check_headers(by_file: dict[Path, list[str]], targets: dict[str, Piece]) -> torch.dtype:
    """Check every tensor's shape and dtype from the headers, before any memory is allocated.

    Returns the dtype of the embedding, taken as the checkpoint's dtype.
    """
    dtype = torch.float32
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(
                            f"{file}: lacks tensor {name} that {INDEX_NAME} lists"
                        )
                    info = f.get_slice(name)
                    shape, stored = tuple(info.get_shape()), info.get_dtype()
                    expected = targets[name].shape
                    if shape != expected:
                        raise CheckpointError(
                            f"{file}: tensor {name} has shape {shape}, "
                            f"expected {expected} for this config.json"
                        )
                    if stored not in _SAFETENSORS_FLOATS:
                        raise CheckpointError(
                            f"{file}: tensor {name} has dtype {stored}, "
                            "expected a floating-point dtype (F32, F16, BF16)"
                        )
                    if name.endswith("model.embed_tokens.weight"):
                        dtype = _SAFETENSORS_FLOATS[stored]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return dtype


def _check_names(
    path: Path,
    files: dict[str, Path],
    layout: dict[str, list[Piece]],
    config: ModelConfig,
    prefix: str = "",
) -> dict[str, Path]:
    """Every expected tensor present, nothing unknown: name the first culprit otherwise. A
    multimodal checkpoint's (``prefix``) vision tensors are not unknown, just not read."""
    expected = {p.hf_name for pieces in layout.values() for p in pieces}
    missing = sorted(expected - files.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{more}")
    extra = {n for n in files if n not in expected and not _IGNORED_RE.fullmatch(n)}
    if prefix:
        extra = {n for n in extra if not _VISION_RE.fullmatch(n)}
    if config.tie_embeddings:
        extra.discard(prefix + "lm_head.weight")  # some tied checkpoints store the head anyway
    if extra:
        first = sorted(extra)[0]
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{files[first]}: unexpected tensor {first}{more} for this config.json"
        )
    return files


def _stream(file: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors from ``file``, re-opening the mapping every ``_REMAP_BYTES`` copied."""
    i = 0
    while i < len(names):
        try:
            with safe_open(file, framework="pt") as f:
                copied = 0
                while i < len(names) and copied < _REMAP_BYTES:
                    tensor = f.get_tensor(names[i])
                    yield names[i], tensor
                    copied += tensor.numel() * tensor.element_size()
                    del tensor
                    i += 1
        except SafetensorError as e:
            raise CheckpointError(f"{file}: cannot read tensor {names[i]} ({e})") from None


# ------------------------------------------------------------------------------------- save
def save(
    model: Transformer,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> None:
    """Write ``model`` as a Hugging Face Llama directory that ``transformers`` loads
    (``Llama4ForCausalLM`` for a Llama 4 model).

    Above ``max_shard_size`` the weights are split into ``model-0000k-of-0000n.safetensors``
    with a ``model.safetensors.index.json``. Each file is written atomically, and weight files
    left by an earlier save into the same directory are removed.

    The token ids come from the tokenizer (this room does not read tokenizers): ``bos_token_id``
    and ``eos_token_id`` go into config.json; ``stop_token_ids``, every id generation ends on,
    into generation_config.json, so ``transformers``' ``generate`` stops where camelid does.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    config = model.config
    dtype = save_dtype(model)

    # Group the HF tensors into shards in HF order, each shard at most `limit` bytes.
    shards: list[list[str]] = [[]]
    size = 0
    for piece in _pieces(config):
        nbytes = _numel(piece.shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(piece.hf_name)
        size += nbytes
    shards[-1] += [name for name, _ in selection_biases(model)]
    n = len(shards)
    names = (
        [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    weight_map, total = {}, 0
    written = hf_tensors(model)  # the same order: one tensor at a time, one shard in memory
    for shard, file in zip(shards, names, strict=True):
        tensors = dict(itertools.islice(written, len(shard)))
        assert list(tensors) == shard
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        with atomic_path(path / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = config.to_hf(dtype_name, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    write_text_atomic(path / CONFIG_NAME, json.dumps(hf_config, indent=2) + "\n")
    if stop_token_ids is not None:
        generation = {
            "bos_token_id": bos_token_id,
            "eos_token_id": [int(i) for i in stop_token_ids],
        }
        if bos_token_id is None:
            del generation["bos_token_id"]
        write_text_atomic(path / GENERATION_CONFIG_NAME, json.dumps(generation, indent=2) + "\n")
    index = path / INDEX_NAME
    if n > 1:
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(index, json.dumps(body, indent=2) + "\n")
    stale = [p for p in path.iterdir() if _SHARD_RE.fullmatch(p.name) and p.name not in names]
    if n > 1 and (path / SINGLE_NAME).exists():
        stale.append(path / SINGLE_NAME)
    if n == 1 and index.exists():
        stale.append(index)
    for p in stale:
        p.unlink()


def save_dtype(model: Transformer) -> torch.dtype:
    """The dtype :func:`save` writes ``model`` in: its parameters' one dtype, else float32."""
    dtypes = {p.dtype for p in model.parameters()}
    return next(iter(dtypes)) if len(dtypes) == 1 else torch.float32


def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor :func:`save` writes for ``model``, in file order: its HF name and the tensor
    exactly as written (on the CPU, in :func:`save_dtype`, contiguous), made one at a time so a
    model on a GPU or being cast is never copied whole. The tied head is not among them: HF
    stores it once, as the embedding. What is saved and what is hashed
    (:mod:`camelid.weights.digest`) are both these tensors."""
    params = dict(model.named_parameters(remove_duplicate=False))
    dtype = save_dtype(model)
    for name, pieces in hf_layout(model.config).items():
        for piece in pieces:
            rows = params[name].detach()[piece.start : piece.start + piece.shape[0]]
            rows = rows.to(device="cpu", dtype=dtype).contiguous()
            yield piece.hf_name, to_hf_rows(rows, piece).contiguous()
    yield from selection_biases(model)


def selection_biases(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """The MoE layers' selection biases as saved (fp32, on the CPU), when any is not zero:
    they choose the experts, so an export without them would route differently."""
    out = []
    for i, block in enumerate(model.layers):
        bias = getattr(block.feed_forward, "selection_bias", None)
        if bias is not None:
            out.append((_SELECTION_BIAS.format(i), bias.detach().to("cpu", torch.float32)))
    return out if any(bool(t.any()) for _, t in out) else []


def _pieces(config: ModelConfig) -> Iterator[Piece]:
    for pieces in hf_layout(config).values():
        yield from pieces


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, show: bool | None, unit: str = "tensor"):
    """A tqdm bar on stderr (``show=None``: when it is a terminal) counting tensors or, with
    ``unit="B"``, bytes."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return _NoBar()
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, leave=False, **scale)
