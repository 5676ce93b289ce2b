"""The MoE layer against a naive per-expert, per-token reference (forward and backward), the
Llama 4 config fields, presets, published counts and HF mapping, and MoE blocks in the model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import camelid_main as main

from camelid import ConfigError, ModelConfig, Transformer
from camelid.model.moe import MoE, grouped_mm_supported


def _config(E: int, k: int, scoring: str, shared: int = 1, dim: int = 16, F_: int = 8):
    return ModelConfig.from_preset(
        "tiny",
        dim=dim,
        n_heads=2,
        n_kv_heads=1,
        n_experts=E,
        n_experts_per_tok=k,
        n_shared_experts=shared,
        moe_ffn_dim=F_,
        router_scoring=scoring,
    )


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The rule written out token by token and expert by expert (no sorting, no grouping)."""
    w13, w2 = moe.experts.w13, moe.experts.w2
    hidden = moe.experts.hidden
    outs = []
    for t in range(x.shape[0]):
        xt = x[t]
        logits = moe.router.weight.float() @ xt.float()
        sigmoid = moe.scoring == "sigmoid"
        scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
        picked = sorted(
            range(moe.n_experts),
            key=lambda e: -(scores[e].item() + moe.selection_bias[e].item()),
        )[: moe.top_k]
        total = sum(scores[e] for e in picked)
        out = torch.zeros_like(xt)
        for e in range(moe.n_experts):
            if e not in picked:
                continue
            inp = xt * scores[e] if moe.scoring == "sigmoid" else xt
            h = inp @ w13[e]
            y = (F.silu(h[:hidden]) * h[hidden:]) @ w2[e]
            out = out + (y if moe.scoring == "sigmoid" else y * scores[e] / total)
        if moe.shared is not None:
            s = moe.shared
            out = out + s.w2.weight @ (F.silu(s.w1.weight @ xt) * (s.w3.weight @ xt))
        outs.append(out)
    return torch.stack(outs)


def _grads(moe: MoE, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    out = fn(x)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)  # a non-uniform upstream gradient
    (out * weight).sum().backward()
    return out.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}


CASES = [
    # (E, top-k, scoring, shared experts, starve): starve > 0 leaves that many experts unused
    (4, 1, "sigmoid", 1, 0),
    (4, 1, "sigmoid", 1, 2),
    (8, 2, "sigmoid", 1, 3),
    (6, 2, "softmax", 0, 0),
    (8, 3, "softmax", 2, 2),
    (3, 3, "sigmoid", 0, 0),
]


@pytest.mark.parametrize("impl", ["bmm", "grouped_mm"])
@pytest.mark.parametrize("E,k,scoring,shared,starve", CASES)
def test_grouped_moe_equals_reference_forward_and_backward(E, k, scoring, shared, starve, impl):
    torch.manual_seed(E * 10 + k)
    config = _config(E, k, scoring, shared)
    moe = MoE(config, impl=impl).double() if impl == "bmm" else MoE(config, impl=impl)
    dtype = torch.float64 if impl == "bmm" else torch.float32
    with torch.no_grad():
        moe.experts.w13.normal_(0, 0.3)
        moe.experts.w2.normal_(0, 0.3)
        if starve:  # experts the selection bias keeps out of every top-k: they get no tokens
            moe.selection_bias[:starve] = -10.0
    if impl == "grouped_mm" and not grouped_mm_supported(
        torch.zeros(1, 16), moe.experts.w13, moe.experts.w2
    ):
        pytest.skip("torch._grouped_mm does not run these shapes here")
    x = torch.randn(2, 7, config.dim, dtype=dtype)
    out, grads = _grads(moe, x, lambda t: moe(t))
    ref, ref_grads = _grads(moe, x, lambda t: _reference(moe, t.reshape(-1, t.shape[-1])))
    assert torch.allclose(out.reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5), name
    assert int(moe.tokens_seen.sum()) == 14 * k
    if starve:
        assert moe.tokens_seen[:starve].tolist() == [0] * starve
        assert (grads["experts.w13"][:starve] == 0).all()
        assert (grads["experts.w2"][:starve] == 0).all()
    assert grads["router.weight"].abs().sum() > 0  # the gate values carry gradient to the router


def test_selection_bias_changes_selection_not_gates():
    torch.manual_seed(0)
    moe = MoE(_config(4, 1, "sigmoid"))
    x = torch.randn(32, 16)
    chosen, gates = moe.route(x)
    logits = x @ moe.router.weight.T
    assert torch.equal(chosen[:, 0], logits.argmax(-1))
    assert torch.allclose(gates[:, 0], torch.sigmoid(logits.gather(-1, chosen)[:, 0]))
    moe.selection_bias[2] = 100.0  # expert 2 now wins every selection ...
    chosen, gates = moe.route(x)
    assert (chosen == 2).all()
    assert torch.allclose(gates[:, 0], torch.sigmoid(logits[:, 2]))  # ... with its own score


def test_router_runs_in_fp32_and_bf16_layer_follows_reference():
    torch.manual_seed(1)
    moe = MoE(_config(4, 2, "sigmoid"))
    x = torch.randn(10, 16)
    ref = moe(x)
    moe16 = moe.to(torch.bfloat16)
    out = moe16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    _, gates = moe16.route(x.to(torch.bfloat16))
    assert gates.dtype == torch.float32
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_padded_bmm_and_grouped_mm_agree():
    torch.manual_seed(2)
    config = _config(8, 2, "sigmoid")
    a, b = MoE(config, impl="bmm"), MoE(config, impl="grouped_mm")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 16)
    if not grouped_mm_supported(x, a.experts.w13, a.experts.w2):
        pytest.skip("torch._grouped_mm does not run these shapes here")
    assert torch.allclose(a(x), b(x), atol=1e-6)


# ------------------------------------------------------------------------ config and presets
def _sig(x: float, digits: int) -> float:
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def test_llama4_published_counts():
    """Meta's figures: Scout 17B active / 109B total, Maverick 17B / 400B, Behemoth 288B active
    of nearly 2T. "17B", "400B" and "2T" are stated to 2 significant figures; 109B and 288B to
    3. Meta's 109B for Scout counts the vision encoder and projector of the released checkpoint
    as well; our models are the text part, so that count is added (computed from HF's vision
    model with Scout's vision config, not typed in)."""
    scout = ModelConfig.from_preset("llama-4-scout")
    maverick = ModelConfig.from_preset("llama-4-maverick")
    behemoth = ModelConfig.from_preset("llama-4-behemoth")
    for c in (scout, maverick):
        assert _sig(c.num_params(active=True), 2) == 17e9
        assert _sig(c.num_params(active=True), 3) == 17.2e9  # what "17B" rounds
    assert _sig(maverick.num_params(), 2) == 400e9
    assert _sig(behemoth.num_params(active=True), 3) == 288e9
    assert _sig(behemoth.num_params(), 2) == 2.0e12
    assert behemoth.n_experts == 16
    assert _sig(scout.num_params() + _scout_vision_params(), 3) == 109e9


def _scout_vision_params() -> int:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    vision = transformers.Llama4VisionConfig(
        hidden_size=1408,
        intermediate_size=5632,
        num_hidden_layers=34,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projector_input_dim=4096,
        projector_output_dim=4096,
        vision_output_dim=4096,
        pixel_shuffle_ratio=0.5,
    )
    with torch.device("meta"):
        model = Llama4VisionModel(vision)
    projector = 4096 * 5120  # multi_modal_projector.linear_1, no bias
    return sum(p.numel() for p in model.parameters()) + projector


@pytest.mark.parametrize("name", ["llama-4-scout", "llama-4-maverick"])
def test_counts_equal_hf_llama4_model(name):
    """Our analytic total equals the parameters HF's Llama4ForCausalLM holds for to_hf()."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4ForCausalLM

    config = ModelConfig.from_preset(name)
    hf = {
        k: v
        for k, v in config.to_hf().items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    with torch.device("meta"):
        model = Llama4ForCausalLM(transformers.Llama4TextConfig(**hf))
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_dense_defaults_unchanged():
    c = ModelConfig.from_preset("llama-3.1-8b")
    assert not c.is_moe and c.n_moe_layers == 0
    assert c.num_params(active=True) == c.num_params()
    assert c.to_hf()["model_type"] == "llama"
    assert "active" not in c.describe(1024)["params"]
    assert c.moe_ffn_dim is None and c.nope_layer_interval == 0 and not c.use_qk_norm
    # Llama 4 attention on a dense model: written as Llama 4 with no experts, read back equal.
    d = dataclasses.replace(c, nope_layer_interval=4, attention_chunk_size=128, use_qk_norm=True)
    assert d.to_hf()["model_type"] == "llama4_text"
    assert ModelConfig.from_hf(d.to_hf()) == d


def test_active_params_and_flops_for_moe():
    c = ModelConfig.from_preset("llama-4-maverick")
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [c.is_nope_layer(i) for i in range(8)] == [False, False, False, True] * 2
    d, F_ = c.dim, c.moe_ffn_dim
    assert c.num_params() - c.num_params(active=True) == 24 * 127 * 3 * d * F_
    dense = dataclasses.replace(c, n_experts=0)
    # FLOPs follow the active parameters: one routed + one shared expert + router per MoE layer.
    extra = 6 * 24 * (2 * 3 * d * F_ + d * c.n_experts - 3 * d * c.ffn_hidden_dim)
    assert c.flops_per_token(4096) - dense.flops_per_token(4096) == extra
    params = c.describe(4096)["params"]
    assert params["active"] == c.num_params(active=True) < params["total"]


def test_hf_round_trip_and_key_names():
    for name in ("llama-4-scout", "llama-4-maverick", "llama-4-behemoth"):
        c = ModelConfig.from_preset(name)
        hf = c.to_hf()
        assert ModelConfig.from_hf(hf) == c
        assert ModelConfig.from_hf({"model_type": "llama4", "text_config": hf}) == c
    hf = ModelConfig.from_preset("llama-4-maverick").to_hf()
    assert hf["intermediate_size"] == 8192 and hf["intermediate_size_mlp"] == 16384
    assert hf["moe_layers"] == list(range(1, 48, 2))
    assert hf["no_rope_layers"][:4] == [1, 1, 1, 0]
    # What the published config.json carries: no moe_layers / no_rope_layers lists.
    for key in ("moe_layers", "no_rope_layers"):
        hf.pop(key)
    assert ModelConfig.from_hf(hf) == ModelConfig.from_preset("llama-4-maverick")


def test_hf_llama4_errors_name_the_field():
    hf = ModelConfig.from_preset("llama-4-scout").to_hf()
    with pytest.raises(ConfigError, match=r"c\.json: moe_layers"):
        ModelConfig.from_hf({**hf, "moe_layers": [0, 5]}, source="c.json")
    with pytest.raises(ConfigError, match="no_rope_layers has 3 entries"):
        ModelConfig.from_hf({**hf, "no_rope_layers": [1, 0, 1]}, source="c.json")
    bad = {k: v for k, v in hf.items() if k != "num_local_experts"}
    with pytest.raises(ConfigError, match="num_local_experts"):
        ModelConfig.from_hf(bad)
    mixtral_like = _config(4, 2, "softmax", shared=0)
    with pytest.raises(ConfigError, match="router_scoring"):
        mixtral_like.to_hf()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n_experts=4, n_experts_per_tok=5), "n_experts_per_tok"),
        (dict(n_experts=-1), "n_experts"),
        (dict(router_scoring="relu"), "router_scoring"),
        (dict(moe_interleave_step=0), "moe_interleave_step"),
        (dict(attention_chunk_size=0), "attention_chunk_size"),
        (dict(moe_ffn_dim=0), "moe_ffn_dim"),
    ],
)
def test_moe_validation_names_the_field(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_preset("tiny", **kwargs)


# ------------------------------------------------------------------------------ in the model
def _tiny_moe(**overrides) -> ModelConfig:
    fields = dict(n_layers=4, n_experts=4, n_experts_per_tok=2, n_shared_experts=1)
    fields.update(moe_ffn_dim=32, moe_interleave_step=2)
    return ModelConfig.from_preset("tiny", **{**fields, **overrides})


def test_blocks_follow_the_interleave_step():
    from camelid.model.moe import MoE as MoELayer
    from camelid.model.transformer import FeedForward

    model = Transformer(_tiny_moe())
    kinds = [type(b.feed_forward) for b in model.layers]
    assert kinds == [FeedForward, MoELayer, FeedForward, MoELayer]
    assert model.num_params() == model.config.num_params()
    dense = Transformer(ModelConfig.from_preset("tiny"))
    assert all(isinstance(b.feed_forward, FeedForward) for b in dense.layers)


def test_moe_model_trains_and_decodes_with_cache():
    from camelid.model.transformer import KVCache

    torch.manual_seed(0)
    config = _tiny_moe()
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    logits = model(tokens)
    logits.float().logsumexp(-1).mean().backward()
    moe = model.layers[1].feed_forward
    assert moe.experts.w13.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert int(moe.tokens_seen.sum()) == 2 * 12 * config.n_experts_per_tok
    with torch.no_grad():
        cache = KVCache(config, 2, 16, "cpu", torch.float32)
        model(tokens[:, :8], cache=cache)
        steps = [model(tokens[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache)
                 for t in range(8, 12)]  # fmt: skip
        full = model(tokens)
    assert torch.allclose(torch.cat(steps, 1), full[:, 8:], atol=1e-5)


def test_init_zeroes_selection_bias_and_scales_expert_outputs():
    config = _tiny_moe()
    model = Transformer.empty(config)
    moe = model.layers[1].feed_forward
    assert (moe.selection_bias == 0).all()  # set even before any init or load
    moe.selection_bias.fill_(3.0)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    assert (moe.selection_bias == 0).all()
    plan = {name: (kind, s) for name, kind, s in model.init_plan()}
    assert (
        plan["layers.1.feed_forward.experts.w2"][1] < plan["layers.1.feed_forward.experts.w13"][1]
    )
    assert "layers.1.feed_forward.selection_bias" in model.state_dict()


@pytest.mark.parametrize("qk_norm", [True, False])
def test_logits_match_hf_llama4(qk_norm, tmp_path):
    """A tiny Llama 4 (MoE every 2nd layer, top-2, NoPE every 2nd layer with temperature
    tuning, chunked attention of 4, QK-norm) saved by transformers and read by camelid.load
    (the one weight mapping, camelid.weights.hf) gives HF's logits, with and without a KV
    cache."""
    transformers = pytest.importorskip("transformers")
    import camelid
    from camelid.model.transformer import KVCache

    torch.manual_seed(0)
    hf_config = transformers.Llama4TextConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=16, intermediate_size_mlp=48,
        num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2,
        no_rope_layer_interval=2, attention_chunk_size=4, attn_temperature_tuning=True,
        floor_scale=4, attn_scale=0.5, use_qk_norm=qk_norm, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.Llama4ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = camelid.load(tmp_path / "hf").eval()
    config = model.config
    assert config.n_moe_layers == 2 and config.is_nope_layer(1) and not config.is_nope_layer(0)
    tokens = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
        cache = KVCache(config, 2, 16, "cpu", torch.float32)
        first = model(tokens[:, :6], cache=cache)
        steps = [model(tokens[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache)
                 for t in range(6, 13)]  # fmt: skip
    assert torch.allclose(torch.cat([first, *steps], 1), ref, atol=1e-4, rtol=1e-4)


def test_inspect_shows_total_and_active(capsys):
    assert main(["inspect", "llama-4-maverick"]) == 0
    out = capsys.readouterr().out
    c = ModelConfig.from_preset("llama-4-maverick")
    assert f"({c.num_params():,})" in out and f"({c.num_params(active=True):,})" in out
    assert "128 x SwiGLU 8192, top-1 sigmoid, 1 shared" in out and "(24 MoE)" in out
    assert main(["inspect", "llama-4-scout", "--json", "--seq-len", "4096"]) == 0
    data = json.loads(capsys.readouterr().out)
    scout = ModelConfig.from_preset("llama-4-scout")
    assert data["params"]["active"] == scout.num_params(active=True)
    assert data["flops_per_token"]["training"] == scout.flops_per_token(4096)
