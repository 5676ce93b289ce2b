"""LoRA adapters in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What peft 0.21 writes for a ``LlamaForCausalLM`` and reads with
``PeftModel.from_pretrained(model, DIR)``: the config's fields (peft_type LORA, task_type
CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, bias "none", ...) and one tensor pair
per adapted HF module, ``base_model.model.<HF module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r). The HF module names come from :func:`camelid.weights.hf.hf_layout`
(the one camelid <-> HF mapping): camelid's fused ``wqkv`` rows [0, q) are ``q_proj``, and so
on; Llama 4's q/k rows, stored by HF in Meta's interleaved RoPE order, are permuted in B's rows
exactly as the base weights are.

camelid also records the weights digest of the base it was trained on
(:mod:`camelid.weights.digest`) and that base's dtype in the safetensors header metadata
(``camelid.base_digest``, ``camelid.base_dtype``): peft ignores that header, while an unknown
key in adapter_config.json makes it warn. Loading an adapter onto another base model (a
shape that differs, or a recorded digest that differs from the model's in the same dtype) is
an error naming both; the digests are compared in the recorded dtype, so an adapter trained
on a bf16 base upcast to fp32 still matches that base loaded in bf16, and the reverse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid.errors import CheckpointError, ConfigError
from camelid.io import atomic_path, write_text_atomic
from camelid.model import Transformer
from camelid.model.lora import (
    LoraConfig,
    apply_lora,
    lora_modules,
    lora_named_parameters,
    targets_of,
)
from camelid.weights import hf
from camelid.weights.digest import dtype_name, model_digest, tensors_digest

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> LoraModel -> the HF model
_DIGEST_KEY, _DTYPE_KEY = "camelid.base_digest", "camelid.base_dtype"
PEFT_VERSION = "0.21.2"  # the peft release whose format this is (what it reads back)

# peft's fields a camelid adapter cannot express, with the value that means "not used".
_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
}


@dataclass(frozen=True)
class AdapterSlot:
    """Where one peft tensor pair lives in camelid: the wrapped module, the projection's peft
    name, and the HF layout piece (its HF name and, for Llama 4's q/k, its RoPE row order)."""

    module: str
    target: str
    piece: hf.Piece

    @property
    def key(self) -> str:
        return _PREFIX + self.piece.hf_name.removesuffix(".weight")


def adapter_layout(model: Transformer, config: LoraConfig) -> list[AdapterSlot]:
    """Every (camelid module, peft target) ``config`` adapts in ``model``, with its HF name,
    in model order: the targets of :func:`camelid.model.lora.targets_of` matched to
    :func:`camelid.weights.hf.hf_layout`'s pieces by their start row."""
    layout = hf.hf_layout(model.config)
    slots = []
    for name, module in model.named_modules():
        for attr, slices in targets_of(module, config):
            full = f"{name}.{attr}" if name else attr
            pieces = {p.start: p for p in layout[f"{full}.weight"]}
            for target, (start, stop) in slices.items():
                piece = pieces.get(start)
                if piece is None or piece.shape[0] != stop - start:
                    raise CheckpointError(f"{full}: rows {start}:{stop} are no HF tensor")
                if not piece.hf_name.endswith(f".{target}.weight"):
                    raise CheckpointError(f"{full}: rows {start}:{stop} are {piece.hf_name}")
                slots.append(AdapterSlot(full, target, piece))
    return slots


def peft_config(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json as peft 0.21 writes it for this adapter (every field it saves)."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": config.alpha,
        "lora_bias": False,
        "lora_dropout": config.dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "qalora_group_size": 16,
        "r": config.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(config.target_modules),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def save_adapter(
    model: Transformer,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    base_digest: str | None = None,
) -> Path:
    """Write ``model``'s adapters as a peft adapter directory (each file atomically; the
    config last, so a directory with a config holds its weights). ``base_digest``: the
    weights digest of the base the adapters belong to, by default computed from ``model``
    (its base weights are untouched by the adapters)."""
    modules = lora_modules(model)
    config = getattr(model, "lora_config", None)
    if not modules or config is None:
        raise ConfigError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for slot in adapter_layout(model, config):
        module = modules[slot.module]
        A = module.lora_A[slot.target].weight.detach()
        B = module.lora_B[slot.target].weight.detach()
        tensors[slot.key + ".lora_A.weight"] = A.to("cpu").contiguous()
        tensors[slot.key + ".lora_B.weight"] = hf.to_hf_rows(B.to("cpu"), slot.piece).contiguous()
    meta = {
        "format": "pt",
        _DIGEST_KEY: base_digest or model_digest(model),
        _DTYPE_KEY: dtype_name(hf.save_dtype(model)),
    }
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    body = peft_config(config, base_model_name_or_path)
    write_text_atomic(path / CONFIG_NAME, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


class _Cast(Mapping):
    """Tensors cast to ``dtype`` one at a time, as they are read."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.tensors, self.dtype = tensors, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def base_digest(model: Transformer, dtype: torch.dtype) -> str:
    """The weights digest of ``model``'s base weights as they would be in ``dtype``: the
    adapter's base recorded in bf16 and this model loaded in fp32 from it (an exact upcast)
    compare equal, and another base differs in any dtype. A wrapped model's base tensors keep
    their names, so this is also right after :func:`apply_lora`."""
    tensors = dict(hf.hf_tensors(model))
    if all(t.dtype == dtype for t in tensors.values()):
        return tensors_digest(tensors)
    return tensors_digest(_Cast(tensors, dtype))


@torch.no_grad()
def load_lora_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy :func:`camelid.model.lora.lora_state_dict` output (a LoRA run's checkpoint) back:
    every adapter, nothing else, the same shapes, or an error naming the first difference."""
    params = dict(lora_named_parameters(model))
    missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"LoRA state: {what} (the adapters differ from the model's)")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise CheckpointError(
                f"LoRA state: {name} has shape {tuple(state[name].shape)}, expected "
                f"{tuple(p.shape)}"
            )
        p.copy_(state[name])


def read_adapter_config(path: str | Path) -> tuple[LoraConfig, dict[str, Any]]:
    """An adapter directory's config as a :class:`LoraConfig` (and the raw JSON), checked: a
    LoRA adapter for a causal LM, using nothing camelid cannot compute exactly."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such adapter directory")
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (not a peft adapter directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {raw.get('peft_type')!r}, expected 'LORA'")
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise CheckpointError(f"{file}: task_type {raw['task_type']!r}, expected 'CAUSAL_LM'")
    for key, off in _UNSUPPORTED.items():
        value = raw.get(key, off)
        if value != off and not (off in ({}, None, False) and not value):
            raise CheckpointError(
                f"{file}: {key} = {json.dumps(value)} is not supported by camelid "
                f"(only {json.dumps(off)})"
            )
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]  # peft reads a string as a regex; one plain name is that name
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{file}: target_modules must be a list of module names")
    try:
        config = LoraConfig(
            r=raw.get("r"),
            alpha=raw.get("lora_alpha"),
            dropout=float(raw.get("lora_dropout") or 0.0),
            target_modules=tuple(targets),
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    return config, raw


def load_adapter(
    model: Transformer,
    path: str | Path,
    *,
    base_name: str | None = None,
    check_digest: bool = True,
) -> Transformer:
    """Apply the peft adapter in ``path`` to ``model`` (in place; see
    :func:`camelid.model.lora.apply_lora`): every tensor checked against this model's shapes,
    and, where camelid recorded the base's digest, that digest against ``model``'s weights
    in the recorded dtype (:func:`base_digest`). ``base_name`` names ``model`` in the error
    for another base model."""
    path = Path(path)
    config, raw = read_adapter_config(path)
    file = path / WEIGHTS_NAME
    recorded_base = raw.get("base_model_name_or_path") or "not recorded"
    this = base_name or "this model"
    other = f"{path} is an adapter for another base model ({recorded_base}) than {this}"
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    dtype = hf.SAFETENSORS_DTYPES.get(meta.get(_DTYPE_KEY, ""))
    if check_digest and meta.get(_DIGEST_KEY) and dtype is not None:
        digest = base_digest(model, dtype)
        if digest != meta[_DIGEST_KEY]:
            raise CheckpointError(
                f"{other}: its base's weights digest is {meta[_DIGEST_KEY][:16]}, "
                f"{this}'s is {digest[:16]} (in {meta[_DTYPE_KEY]})"
            )
    slots = adapter_layout(model, config)
    expected = {}
    for slot in slots:
        rows, cols = slot.piece.shape
        expected[slot.key + ".lora_A.weight"] = (config.r, cols)
        expected[slot.key + ".lora_B.weight"] = (rows, config.r)
    unknown = sorted(set(stored) - set(expected))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(f"{other}: it holds {unknown[0]}{more}, which {this} lacks")
    missing = sorted(set(expected) - set(stored))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file}: lacks {missing[0]}{more} of target_modules")
    for key, shape in expected.items():
        if stored[key] != shape:
            raise CheckpointError(
                f"{other}: tensor {key} has shape {stored[key]}, {this} needs {shape}"
            )
    try:
        apply_lora(model, config)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None
    modules = lora_modules(model)
    with torch.no_grad(), safe_open(file, framework="pt") as f:
        for slot in slots:
            module = modules[slot.module]
            A = f.get_tensor(slot.key + ".lora_A.weight")
            B = hf.from_hf_rows(f.get_tensor(slot.key + ".lora_B.weight"), slot.piece)
            module.lora_A[slot.target].weight.copy_(A)
            module.lora_B[slot.target].weight.copy_(B)
    return model
