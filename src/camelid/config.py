"""Model configuration: every hyper-parameter of the Llama family (dense and Llama 4 MoE),
presets, HF mapping.

This module is the single home of the facts derived from a config: the FFN width rule, the
parameter count, the training FLOPs per token and the memory estimates. It imports nothing
heavier than the standard library so that ``camelid inspect`` answers instantly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.errors import ConfigError

# Bytes per parameter for full AdamW training with fp32 master weights: weights (4) + gradients
# (4) + first and second moments (4 + 4). Activations come on top and depend on the batch.
ADAMW_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" RoPE frequency scaling.

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept,
    those longer than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``, and the band in between is interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ConfigError(
                f"rope_scaling.rope_type: unsupported type {self.rope_type!r} (supported: 'llama3')"
            )
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor <= self.high_freq_factor:
            raise ConfigError(
                "rope_scaling: need 0 < low_freq_factor <= high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama model: dense (Llama 1, 2, 3, 3.1, 3.2, 3.3) or MoE (Llama 4).

    ``n_kv_heads``, ``head_dim`` and ``ffn_hidden_dim`` may be left ``None`` and are then derived:
    MHA, ``dim // n_heads`` and Meta's FFN rule (see :func:`ffn_hidden_dim_for`). Use
    :func:`dataclasses.replace` to change a field; the result is validated again.

    MoE fields (``n_experts > 0`` turns them on; the defaults are the dense model): layer ``i``
    (0-based) has an MoE FFN when ``(i + 1) % moe_interleave_step == 0`` and the dense SwiGLU of
    width ``ffn_hidden_dim`` otherwise. An MoE FFN routes each token to ``n_experts_per_tok`` of
    ``n_experts`` SwiGLU experts of width ``moe_ffn_dim`` (default ``ffn_hidden_dim``; None in a
    dense config) and adds ``n_shared_experts`` always-on experts of the same width.
    ``router_scoring`` "sigmoid" is Llama 4 (the score scales the expert's input), "softmax" is
    Mixtral (renormalised top-k weights scale the outputs).

    Llama 4 attention fields: layer ``i`` is NoPE when ``nope_layer_interval`` and
    ``(i + 1) % nope_layer_interval == 0``; RoPE layers attend within blocks of
    ``attention_chunk_size`` tokens (None: no chunking) and RMS-normalise q and k per head when
    ``use_qk_norm``; NoPE layers scale q by ``1 + attn_scale * ln(floor((pos + 1) /
    floor_scale) + 1)`` when ``attn_temperature_tuning``.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden_dim: int | None = None
    # Inputs of the FFN width rule only; two configs with the same ffn_hidden_dim are equal.
    multiple_of: int = field(default=256, compare=False)
    ffn_dim_multiplier: float | None = field(default=None, compare=False)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # ---- mixture of experts (Llama 4 / Mixtral); n_experts 0 = dense
    n_experts: int = 0
    n_experts_per_tok: int = 1
    n_shared_experts: int = 0
    moe_interleave_step: int = 1
    moe_ffn_dim: int | None = None
    router_scoring: str = "sigmoid"
    # ---- Llama 4 attention (iRoPE, chunked local attention, temperature tuning, QK-norm)
    nope_layer_interval: int = 0
    attention_chunk_size: int | None = None
    attn_temperature_tuning: bool = False
    attn_scale: float = 0.1
    floor_scale: int = 8192
    use_qk_norm: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a positive multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                    "unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even number, got {self.head_dim}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ConfigError(f"ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")
        if self.ffn_hidden_dim is None:
            object.__setattr__(
                self,
                "ffn_hidden_dim",
                ffn_hidden_dim_for(self.dim, self.multiple_of, self.ffn_dim_multiplier),
            )
        if self.ffn_hidden_dim <= 0:
            raise ConfigError(f"ffn_hidden_dim must be > 0, got {self.ffn_hidden_dim}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        self._validate_moe_and_attention()

    def _validate_moe_and_attention(self) -> None:
        for key in ("n_experts", "n_shared_experts", "nope_layer_interval"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
        for key in ("n_experts_per_tok", "moe_interleave_step"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.n_experts and self.n_experts_per_tok > self.n_experts:
            raise ConfigError(
                f"n_experts_per_tok ({self.n_experts_per_tok}) must be <= n_experts "
                f"({self.n_experts})"
            )
        # Derived only for an MoE model, so a dense config's fields stay what they were.
        if self.moe_ffn_dim is None and self.n_experts:
            object.__setattr__(self, "moe_ffn_dim", self.ffn_hidden_dim)
        if self.moe_ffn_dim is not None and (
            not isinstance(self.moe_ffn_dim, int) or self.moe_ffn_dim <= 0
        ):
            raise ConfigError(f"moe_ffn_dim must be a positive integer, got {self.moe_ffn_dim!r}")
        if self.router_scoring not in ("sigmoid", "softmax"):
            raise ConfigError(
                f"router_scoring must be 'sigmoid' or 'softmax', got {self.router_scoring!r}"
            )
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ConfigError(
                f"attention_chunk_size must be a positive integer or null, "
                f"got {self.attention_chunk_size!r}"
            )
        if not self.floor_scale > 0:
            raise ConfigError(f"floor_scale must be > 0, got {self.floor_scale}")

    # ------------------------------------------------------------------------- layer plan
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has an MoE FFN (HF's ``moe_layers`` rule)."""
        return self.is_moe and (layer + 1) % self.moe_interleave_step == 0

    def is_nope_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) runs without RoPE (Llama 4's iRoPE)."""
        return bool(self.nope_layer_interval) and (layer + 1) % self.nope_layer_interval == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see :data:`PRESETS`), optionally with some fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides, "name": name})

    # ------------------------------------------------------------------------------- sizes
    def param_counts(self, active: bool = False) -> dict[str, int]:
        """Parameters by group: embedding, attention, mlp, norm and the output head.

        ``output`` is 0 when the head is tied to the embedding (the weight is shared). ``mlp``
        holds every FFN parameter: dense FFNs, and on MoE layers the router, the routed experts
        and the shared experts. ``active`` counts what one token uses: on MoE layers only
        ``n_experts_per_tok`` routed experts (plus the router and the shared experts).
        """
        d, hd, L = self.dim, self.head_dim, self.n_layers
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        if self.attention_bias:
            attn += q + 2 * kv + d
        dense = 3 * d * self.ffn_hidden_dim
        if self.mlp_bias:
            dense += 2 * self.ffn_hidden_dim + d
        n_moe = self.n_moe_layers
        mlp = (L - n_moe) * dense
        if n_moe:
            expert = 3 * d * self.moe_ffn_dim  # experts have no biases
            routed = self.n_experts_per_tok if active else self.n_experts
            mlp += n_moe * (d * self.n_experts + (routed + self.n_shared_experts) * expert)
        embedding = self.vocab_size * d
        return {
            "embedding": embedding,
            "attention": L * attn,
            "mlp": mlp,
            "norm": (2 * L + 1) * d,
            "output": 0 if self.tie_embeddings else embedding,
        }

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Total parameter count (shared weights counted once), computed without any tensors;
        ``active``: the parameters one token uses (equal to the total for a dense model)."""
        counts = self.param_counts(active=active)
        return sum(counts.values()) - (counts["embedding"] if exclude_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token: ``6·N + 12·L·H·hd·T`` for training (forward: a third).

        ``N`` counts the parameters that take part in a matmul (attention, MLP and the output
        head, which does its matmul even when tied); the embedding lookup does none. For an MoE
        model ``N`` counts the active parameters only (the chosen experts, the shared experts
        and the router), the work a token really does. The second
        term is the attention score and value products at context length ``T`` (default
        ``max_seq_len``), counted without the causal discount, as PaLM and torchtitan do, so
        MFU figures stay comparable with theirs.
        """
        t = self.max_seq_len if seq_len is None else seq_len
        counts = self.param_counts(active=True)
        n = counts["attention"] + counts["mlp"] + self.vocab_size * self.dim
        total = 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * t
        return total if training else total // 3

    def weight_bytes(self, bytes_per_param: int) -> int:
        return self.num_params() * bytes_per_param

    def adamw_training_bytes(self) -> int:
        """Memory for weights, gradients and AdamW moments in fp32 (activations not included)."""
        return self.num_params() * ADAMW_BYTES_PER_PARAM

    def describe(self, seq_len: int) -> dict[str, Any]:
        """The figures that size a model, in one JSON-ready dict (what ``camelid inspect``
        shows): the config, parameters by group, FLOPs per token at context ``seq_len`` and
        memory for the weights and for AdamW training."""
        return {
            "config": self.to_dict(),
            "params": {
                "total": self.num_params(),
                **self.param_counts(),
                **({"active": self.num_params(active=True)} if self.is_moe else {}),
            },
            "seq_len": seq_len,
            "flops_per_token": {
                "training": self.flops_per_token(seq_len),
                "forward": self.flops_per_token(seq_len, training=False),
            },
            "memory_bytes": {
                "weights_fp32": self.weight_bytes(4),
                "weights_bf16": self.weight_bytes(2),
                "adamw_training": self.adamw_training_bytes(),
            },
        }

    # --------------------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face ``LlamaConfig`` dict, in the transformers 4.x or 5.x style.

        4.x (what the published Llama checkpoints carry) has top-level ``rope_theta`` and
        ``rope_scaling``; 5.x writes ``rope_parameters`` and an explicit ``head_dim``.
        """
        model_type = hf.get("model_type")
        if model_type == "llama4" and isinstance(hf.get("text_config"), dict):
            # The multimodal Llama4Config: the language model is its text_config.
            hf, source = (
                {"model_type": "llama4_text", **hf["text_config"]},
                f"{source}: text_config",
            )
            model_type = "llama4_text"
        if model_type not in ("llama", "llama4_text"):
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r} "
                "(supported: 'llama', 'llama4_text', 'llama4')"
            )
        required = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")

        if isinstance(hf.get("rope_parameters"), dict):
            rope = dict(hf["rope_parameters"])
            key = "rope_parameters"
        else:
            rope = dict(hf.get("rope_scaling") or {})
            rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
            key = "rope_scaling"
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise ConfigError(f"{source}: {key} of type 'llama3' lacks {e.args[0]!r}") from None
        elif rope_type != "default":
            raise ConfigError(
                f"{source}: {key}.rope_type {rope_type!r} is not supported "
                "(supported: 'default', 'llama3')"
            )
        extra = _llama4_fields_from_hf(hf, source) if model_type == "llama4_text" else {}
        try:
            fields = dict(
                vocab_size=int(hf["vocab_size"]),
                dim=int(hf["hidden_size"]),
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=int(hf["num_attention_heads"]),
                n_kv_heads=_opt_int(hf.get("num_key_value_heads")),
                head_dim=_opt_int(hf.get("head_dim")),
                ffn_hidden_dim=int(hf["intermediate_size"]),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope["rope_theta"]),
                rope_scaling=scaling,
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
            )
            return cls(**{**fields, **extra})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad value: {e}") from None

    def to_hf(
        self,
        dtype: str = "float32",
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> dict[str, Any]:
        """A ``LlamaConfig`` dict in the 4.x style, which transformers 4.x and 5.x both read.

        The token ids belong to the tokenizer, not the architecture, so they are passed in;
        given, they are written as ``bos_token_id``/``eos_token_id``, which ``transformers``
        falls back on when a directory has no generation_config.json."""
        rope_scaling = None
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope_scaling = {
                "rope_type": s.rope_type,
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        if self.is_hf_llama4:
            return self._to_hf_llama4(dtype, rope_scaling, bos_token_id, eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_hidden_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            **({} if bos_token_id is None else {"bos_token_id": bos_token_id}),
            **({} if eos_token_id is None else {"eos_token_id": eos_token_id}),
            "torch_dtype": dtype,
        }

    @property
    def is_hf_llama4(self) -> bool:
        """Whether Hugging Face holds this model as Llama 4 (``Llama4ForCausalLM``): it has
        experts or Llama 4 attention. Its config and weight names follow from this."""
        return self.is_moe or self._has_llama4_attention()

    def _has_llama4_attention(self) -> bool:
        return bool(
            self.nope_layer_interval
            or self.attention_chunk_size
            or self.attn_temperature_tuning
            or self.use_qk_norm
        )

    def _to_hf_llama4(
        self,
        dtype: str,
        rope_scaling: dict[str, Any] | None,
        bos_token_id: int | None,
        eos_token_id: int | list[int] | None,
    ) -> dict[str, Any]:
        """A ``Llama4TextConfig`` dict (``Llama4ForCausalLM``). Llama 4 has exactly one shared
        expert, sigmoid routing and no biases; other MoE shapes have no HF Llama 4 form."""
        problems = []
        if self.is_moe and self.n_shared_experts != 1:
            problems.append(f"n_shared_experts {self.n_shared_experts} (Llama 4 has 1)")
        if self.is_moe and self.router_scoring != "sigmoid":
            problems.append(f"router_scoring {self.router_scoring!r} (Llama 4 uses 'sigmoid')")
        if self.attention_bias or self.mlp_bias:
            problems.append("biases (Llama 4 has none)")
        if problems:
            raise ConfigError(
                "config cannot be written as a Hugging Face Llama 4 config: " + "; ".join(problems)
            )
        interval = self.nope_layer_interval
        return {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.moe_ffn_dim or self.ffn_hidden_dim,
            "intermediate_size_mlp": self.ffn_hidden_dim,
            "num_local_experts": self.n_experts,
            "num_experts_per_tok": self.n_experts_per_tok,
            "interleave_moe_layer_step": self.moe_interleave_step,
            "moe_layers": [i for i in range(self.n_layers) if self.is_moe_layer(i)],
            # HF's list is 1 where a layer USES RoPE and 0 on NoPE layers.
            "no_rope_layers": [int(not self.is_nope_layer(i)) for i in range(self.n_layers)],
            "no_rope_layer_interval": interval or self.n_layers + 1,
            "attention_chunk_size": self.attention_chunk_size,
            "attn_temperature_tuning": self.attn_temperature_tuning,
            "attn_scale": self.attn_scale,
            "floor_scale": self.floor_scale,
            "use_qk_norm": self.use_qk_norm,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            **({} if bos_token_id is None else {"bos_token_id": bos_token_id}),
            **({} if eos_token_id is None else {"eos_token_id": eos_token_id}),
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf(hf, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ffn_hidden_dim_for(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4·dim, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _every(n_layers: int, flags: list[bool]) -> int | None:
    """The step ``s`` with ``flags[i] == ((i + 1) % s == 0)`` for all layers (0: none set), or
    None when the layers follow no such rule."""
    if not any(flags):
        return 0
    for step in range(1, n_layers + 1):
        if all(f == ((i + 1) % step == 0) for i, f in enumerate(flags)):
            return step
    return None


def _llama4_fields_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The MoE and attention fields of a ``Llama4TextConfig`` dict, with HF's defaults."""
    missing = [k for k in ("num_local_experts", "intermediate_size_mlp") if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
    try:
        n_layers = int(hf["num_hidden_layers"])
        step = int(hf.get("interleave_moe_layer_step", 1))
        if hf.get("moe_layers") is not None:
            moe = {int(i) for i in hf["moe_layers"]}
            found = _every(n_layers, [i in moe for i in range(n_layers)])
            if found is None:
                raise ConfigError(
                    f"{source}: moe_layers {sorted(moe)} is not every n-th layer; only an "
                    "interleave step is supported"
                )
            if found == 0 and int(hf["num_local_experts"]):
                raise ConfigError(f"{source}: moe_layers is empty but num_local_experts > 0")
            step = found or step
        if hf.get("no_rope_layers"):
            # HF: 1 = the layer uses RoPE, 0 = NoPE.
            flags = [not int(v) for v in hf["no_rope_layers"]]
            if len(flags) != n_layers:
                raise ConfigError(
                    f"{source}: no_rope_layers has {len(flags)} entries for {n_layers} layers"
                )
            interval = _every(n_layers, flags)
            if interval is None:
                raise ConfigError(
                    f"{source}: no_rope_layers is not every n-th layer; only an interval "
                    "is supported"
                )
        else:
            interval = int(hf.get("no_rope_layer_interval", 4))
            interval = interval if interval <= n_layers else 0
        chunk = hf.get("attention_chunk_size", 8192)
        return {
            "ffn_hidden_dim": int(hf["intermediate_size_mlp"]),
            "moe_ffn_dim": int(hf["intermediate_size"]) if int(hf["num_local_experts"]) else None,
            "n_experts": int(hf["num_local_experts"]),
            "n_experts_per_tok": int(hf.get("num_experts_per_tok", 1)),
            "n_shared_experts": 1 if int(hf["num_local_experts"]) else 0,
            "moe_interleave_step": step,
            "router_scoring": "sigmoid",
            "nope_layer_interval": interval,
            "attention_chunk_size": None if chunk is None else int(chunk),
            "attn_temperature_tuning": bool(hf.get("attn_temperature_tuning", True)),
            "attn_scale": float(hf.get("attn_scale", 0.1)),
            "floor_scale": int(hf.get("floor_scale", 8192)),
            "use_qk_norm": bool(hf.get("use_qk_norm", True)),
        }
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value: {e}") from None


_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA31 = {
    "vocab_size": 128256,
    "n_kv_heads": 8,
    "rope_theta": 500000.0,
    "max_seq_len": 131072,
    "rope_scaling": RopeScaling(**_LLAMA3_ROPE),
}
_LLAMA32 = {**_LLAMA31, "rope_scaling": RopeScaling(**{**_LLAMA3_ROPE, "factor": 32.0})}

# Llama 4 text models (HF Llama4TextConfig of the published checkpoints): 48 layers, dim 5120,
# 40/8 heads of 128, SwiGLU experts of 8192 plus one shared expert, top-1 sigmoid routing, a
# NoPE layer every 4th with temperature tuning, chunked attention (8192) elsewhere.
_LLAMA4 = {
    "vocab_size": 202048,
    "dim": 5120,
    "n_layers": 48,
    "n_heads": 40,
    "n_kv_heads": 8,
    "head_dim": 128,
    "ffn_hidden_dim": 16384,  # intermediate_size_mlp: the dense layers' width
    "moe_ffn_dim": 8192,  # intermediate_size: each expert's width
    "n_experts_per_tok": 1,
    "n_shared_experts": 1,
    "router_scoring": "sigmoid",
    "nope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "attn_scale": 0.1,
    "floor_scale": 8192,
    "rope_theta": 500000.0,
    "norm_eps": 1e-5,
}

#: Named configurations. The published ones follow Meta's reference ``params.json`` files;
#: the small ones are for CPU work and tests.
PRESETS: dict[str, dict[str, Any]] = {
    # ---- small, for CPU work and tests
    "tiny": dict(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256
    ),
    "llama-16m": dict(
        vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=1024
    ),
    "llama-125m": dict(
        vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048
    ),
    # ---- Llama 1 and 2 (SentencePiece vocab of 32000, theta 1e4)
    "llama-1-7b": dict(norm_eps=1e-6, max_seq_len=2048),
    "llama-2-7b": dict(max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama-2-70b": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        max_seq_len=4096,
    ),
    # ---- Llama 3, 3.1, 3.2 (tiktoken vocab of 128256, theta 5e5)
    "llama-3-8b": dict(
        **{**_LLAMA31, "max_seq_len": 8192, "rope_scaling": None},
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
    ),
    "llama-3.1-8b": dict(**_LLAMA31, multiple_of=1024, ffn_dim_multiplier=1.3),
    "llama-3.1-70b": dict(
        **_LLAMA31, dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    "llama-3.1-405b": dict(
        **_LLAMA31, dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2
    ),
    "llama-3.2-1b": dict(
        **_LLAMA32,
        dim=2048,
        n_layers=16,
        n_heads=32,
        ffn_dim_multiplier=1.5,
        tie_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        **_LLAMA32,
        dim=3072,
        n_layers=28,
        n_heads=24,
        ffn_dim_multiplier=1.0,
        tie_embeddings=True,
    ),
    # ---- Llama 4 (MoE; tiktoken-style vocab of 202048)
    # Scout: 16 experts on every layer, QK-norm, llama3 RoPE scaling (factor 16), 10M context.
    "llama-4-scout": dict(
        **_LLAMA4,
        n_experts=16,
        moe_interleave_step=1,
        use_qk_norm=True,
        rope_scaling=RopeScaling(
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
        max_seq_len=10485760,
    ),
    # Maverick: 128 experts on every second layer, dense SwiGLU 16384 on the others, 1M context.
    "llama-4-maverick": dict(
        **_LLAMA4, n_experts=128, moe_interleave_step=2, use_qk_norm=False, max_seq_len=1048576
    ),
    # Behemoth (announced, not released): only "288B active, 16 experts, nearly 2T total" is
    # published. The shape is derived, not Meta's: Scout's recipe (every layer MoE, one shared
    # + top-1 of 16 routed experts, head_dim 128, 8 kv heads, the 202048 vocab) and solving
    #   active = L*(attn + 2*3*d*F + d*16) + 2*V*d  = 288B
    #   total  = L*(attn + 17*3*d*F + d*16) + 2*V*d ~ 2T   (so 15*L*3*d*F ~ 1.7T)
    # over d in 8192..20480 by 2048, L by 4 and F by 1024: d 14336 (112 heads), L 128 and
    # F 20480 give 287.7B active and 1.98T total. The dense width (unused: no dense layers)
    # follows Scout's 2x expert width.
    "llama-4-behemoth": dict(
        **{
            **_LLAMA4,
            "dim": 14336,
            "n_layers": 128,
            "n_heads": 112,
            "moe_ffn_dim": 20480,
            "ffn_hidden_dim": 40960,
        },
        n_experts=16,
        moe_interleave_step=1,
        use_qk_norm=True,
        max_seq_len=1048576,
    ),
}
