"""ModelConfig: presets, published parameter counts, derived sizes, validation, HF mapping."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from camelid import ConfigError, ModelConfig, Transformer
from camelid.config import PRESETS, ffn_hidden_dim_for

# Published parameter counts (Meta's model cards and papers).
PUBLISHED = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-2-70b": 69.0e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "llama-3.1-405b": 405.9e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
}


def _sig(x: float, digits: int) -> float:
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    n = ModelConfig.from_preset(name).num_params()
    digits = 4 if name == "llama-3.1-405b" else 3
    assert _sig(n, digits) == _sig(PUBLISHED[name], digits)


@pytest.mark.parametrize("name", list(PRESETS))
def test_meta_model_matches_formula(name):
    """The analytic count equals the parameters a model really holds, group by group."""
    config = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    groups = dict.fromkeys(config.param_counts(), 0)
    for pname, p in model.named_parameters():  # shared (tied) weights are listed once
        key = (
            "embedding" if pname.startswith("tok_embeddings")
            else "output" if pname.startswith("output")
            else "norm" if "norm" in pname
            else "attention" if ".attention." in pname
            else "mlp"
        )  # fmt: skip
        groups[key] += p.numel()
    assert groups == config.param_counts()
    assert model.num_params() == config.num_params()
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "preset,ffn",
    [("llama-2-7b", 11008), ("llama-2-13b", 13824), ("llama-2-70b", 28672),
     ("llama-3.1-8b", 14336), ("llama-3.1-405b", 53248), ("llama-3.2-1b", 8192),
     ("llama-3.2-3b", 8192)],
)  # fmt: skip
def test_ffn_rule_gives_published_widths(preset, ffn):
    assert ModelConfig.from_preset(preset).ffn_hidden_dim == ffn


def test_ffn_rule_rounds_up():
    assert ffn_hidden_dim_for(4096, 256, None) == 11008
    assert ffn_hidden_dim_for(100, 64, None) == 320  # int(266.67) = 266 -> 320
    assert ffn_hidden_dim_for(100, 1, 1.5) == 399


def test_flops_per_token_formula():
    c = ModelConfig.from_preset("tiny")
    counts = c.param_counts()
    n_matmul = counts["attention"] + counts["mlp"] + c.vocab_size * c.dim
    attn = 12 * c.n_layers * c.n_heads * c.head_dim * 100
    assert c.flops_per_token(100) == 6 * n_matmul + attn
    assert c.flops_per_token(100, training=False) == (6 * n_matmul + attn) // 3
    # Tying the head changes the parameter count but not the matmul work.
    tied = dataclasses.replace(c, tie_embeddings=True)
    assert tied.num_params() < c.num_params()
    assert tied.flops_per_token(100) == c.flops_per_token(100)


def test_memory_estimates():
    c = ModelConfig.from_preset("llama-3.1-8b")
    assert c.weight_bytes(2) == 2 * c.num_params()
    assert c.adamw_training_bytes() == 16 * c.num_params()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n_heads=6, n_kv_heads=4, dim=96), "n_kv_heads"),
        (dict(n_heads=5, dim=96), "divisible by n_heads"),
        (dict(n_heads=4, dim=36, head_dim=9), "head_dim"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(n_layers=-1), "n_layers"),
        (dict(vocab_size=1.5), "vocab_size"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier"),
        (dict(rope_scaling=dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)),
         "low_freq_factor"),
        (dict(rope_scaling=dict(rope_type="yarn")), "yarn"),
    ],
)  # fmt: skip
def test_validation_names_the_field(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{"dim": 64, "n_heads": 4, **kwargs})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_preset("llama-9-1t")
    assert "llama-9-1t" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


def test_replace_revalidates():
    c = ModelConfig.from_preset("tiny")
    with pytest.raises(ConfigError):
        dataclasses.replace(c, n_kv_heads=3)


def test_hf_round_trip_all_presets():
    for name in PRESETS:
        c = ModelConfig.from_preset(name)
        assert ModelConfig.from_hf(c.to_hf()) == c


def test_from_hf_styles_agree():
    v4 = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }  # fmt: skip
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    v5["head_dim"] = 128
    assert (
        ModelConfig.from_hf(v4)
        == ModelConfig.from_hf(v5)
        == ModelConfig.from_preset("llama-3.1-8b")
    )
    old = {**v4, "rope_scaling": {"type": "llama3", **v4["rope_scaling"]}}
    del old["rope_scaling"]["rope_type"]
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(v4)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"num_key_value_heads": 5}, "n_kv_heads"),
    ],
)
def test_from_hf_errors(change, needle):
    hf = ModelConfig.from_preset("tiny").to_hf()
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None or k == "rope_scaling"}
    with pytest.raises(ConfigError, match=needle) as err:
        ModelConfig.from_hf(hf, source="ckpt/config.json")
    assert "ckpt/config.json" in str(err.value)
