"""MoE balance: DeepSeek-V3 bias balancing, the router losses and their normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camelid.config import ModelConfig
from camelid.model.moe import MoE
from camelid.train import balance
from camelid.train.distributed import World


def _config(scoring: str = "sigmoid", E: int = 8, k: int = 1, shared: int = 0) -> ModelConfig:
    return ModelConfig.from_preset("tiny", n_experts=E, n_experts_per_tok=k,
                                   n_shared_experts=shared, moe_ffn_dim=32,
                                   router_scoring=scoring)  # fmt: skip


class OneLayer(nn.Module):
    """One MoE FFN where the trainer's helpers find it (``layers.0.feed_forward``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].feed_forward = MoE(config)

    @property
    def moe(self) -> MoE:
        return self.layers[0].feed_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


def _skewed_run(rate: float, scoring: str, seed: int, steps: int = 200) -> tuple[float, int]:
    """Regression through one top-1 layer of 8 experts on skewed inputs: every token's hidden
    state shares one large component (as real hidden states do) plus a Zipf-distributed token
    type. Returns max/mean load and dead experts over the last 20 steps' summed loads."""
    torch.manual_seed(seed)
    model = OneLayer(_config(scoring))
    D, types, N = model.moe.router.in_features, 256, 256
    common, centers, targets = torch.randn(D), torch.randn(types, D), torch.randn(types, D)
    zipf = 1.0 / torch.arange(1, types + 1).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    loads = []
    for _ in range(steps):
        t = torch.multinomial(zipf, N, replacement=True, generator=g)
        x = 2.0 * common + 0.5 * centers[t] + 0.3 * torch.randn(N, D, generator=g)
        balance.begin_step(model, N, 1)
        (model(x) - targets[t]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        stats = balance.end_step(model, World(), N)
        assert int(stats.tokens.sum()) == N  # every token routed once, counted once
        balance.update_bias(model, stats.tokens, rate)
        loads.append(stats.tokens[0])
    window = torch.stack(loads[-20:]).sum(0).double()
    return float(window.max() / window.mean()), int((window == 0).sum())


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_bias_balancing_prevents_collapse_on_skewed_tokens(scoring):
    # Measured over seeds 0-5 for both scorings (docs/moe.md): without balancing the load
    # collapses (max/mean 4.6-8.0 with 2-7 of 8 experts dead); with it 1.10-1.84, none dead.
    none_ratio, none_dead = _skewed_run(0.0, scoring, seed=0)
    bias_ratio, bias_dead = _skewed_run(0.01, scoring, seed=0)
    assert none_ratio > 4.0 and none_dead >= 2, (none_ratio, none_dead)
    assert bias_ratio < 2.0 and bias_dead == 0, (bias_ratio, bias_dead)


def test_bias_update_follows_the_whole_steps_load_and_selects_only():
    model = OneLayer(_config("sigmoid", E=4))
    tokens = torch.tensor([[10, 30, 20, 20]])
    balance.update_bias(model, tokens, 0.5)
    assert model.moe.selection_bias.tolist() == [0.5, -0.5, 0.0, 0.0]
    # The bias changes the choice, never the gate: the gate is the unbiased score.
    x = torch.randn(5, model.moe.router.in_features)
    chosen, gates = model.moe.route(x)
    scores = torch.sigmoid(x @ model.moe.router.weight.T)
    assert torch.equal(chosen, (scores + model.moe.selection_bias).topk(1).indices)
    assert torch.allclose(gates, scores.gather(-1, chosen))
    balance.update_bias(model, tokens, 0.0)  # rate 0: off
    assert model.moe.selection_bias.tolist() == [0.5, -0.5, 0.0, 0.0]


def _explicit_router_losses(moe: MoE, x: torch.Tensor, aux: float, z: float) -> torch.Tensor:
    logits = x @ moe.router.weight.T
    scores = torch.sigmoid(logits) if moe.scoring == "sigmoid" else logits.softmax(-1)
    chosen = (scores.detach() + moe.selection_bias).topk(moe.top_k).indices
    share = torch.bincount(chosen.flatten(), minlength=moe.n_experts) / chosen.numel()
    probs = (scores / scores.sum(-1, keepdim=True)).mean(0)
    return aux * moe.n_experts * (share * probs).sum() + z * logits.logsumexp(-1).square().mean()


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_router_losses_reach_the_router_as_the_documented_objective(scoring):
    torch.manual_seed(0)
    model = OneLayer(_config(scoring, E=4, k=2, shared=1))
    x = torch.randn(12, model.moe.router.in_features)
    balance.configure(model, aux_loss_coef=0.1, z_loss_coef=0.01)
    balance.begin_step(model, step_tokens=12, world_size=1)
    model(x).sum().backward()
    got = model.moe.router.weight.grad.clone()
    model.zero_grad()
    balance.configure(model, 0.0, 0.0)
    (model(x).sum() + _explicit_router_losses(model.moe, x, 0.1, 0.01)).backward()
    assert torch.allclose(got, model.moe.router.weight.grad, atol=1e-6)
    stats = balance.end_step(model, World(), 24)  # two forwards of 12 tokens
    assert stats.aux_loss is None and stats.z_loss is None and int(stats.tokens.sum()) == 48


def test_z_loss_is_a_mean_over_the_steps_tokens_however_they_are_split():
    torch.manual_seed(1)
    model = OneLayer(_config("softmax", E=4, k=1))
    x = torch.randn(16, model.moe.router.in_features)
    balance.configure(model, 0.0, z_loss_coef=1.0)
    grads, values = [], []
    for parts in ([16], [4, 12], [8, 8]):
        balance.begin_step(model, step_tokens=16, world_size=1)
        for piece in x.split(parts):
            (model(piece).sum() * 0).backward()  # only the router loss's gradient
        grads.append(model.moe.router.weight.grad.clone())
        values.append(balance.end_step(model, World(), 16).z_loss)
        model.zero_grad()
    for g, v in zip(grads[1:], values[1:], strict=True):
        assert torch.allclose(g, grads[0], atol=1e-6) and v == pytest.approx(values[0])
    logits = (x @ model.moe.router.weight.T).detach()
    assert values[0] == pytest.approx(float(logits.logsumexp(-1).square().mean()), rel=1e-5)


def test_recomputed_forwards_are_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(2)
    model = OneLayer(_config("sigmoid", E=4, k=2))
    x = torch.randn(10, model.moe.router.in_features, requires_grad=True)
    balance.configure(model, aux_loss_coef=0.1, z_loss_coef=0.1)
    balance.begin_step(model, 10, 1)
    model(x).sum().backward()
    plain = balance.end_step(model, World(), 10)
    model.zero_grad()
    balance.begin_step(model, 10, 1)
    checkpoint(model, x, use_reentrant=False).sum().backward()  # the forward runs twice
    assert int(model.moe.tokens_seen.sum()) == 40
    recomputed = balance.end_step(model, World(), 10)
    assert torch.equal(plain.tokens, recomputed.tokens)
    assert plain.aux_loss == pytest.approx(recomputed.aux_loss)
    assert plain.z_loss == pytest.approx(recomputed.z_loss)


def test_padding_is_routed_but_left_out_of_statistics_and_losses():
    """Packed rows pad with tokens nothing reads: their routing must not move the loads (so the
    bias update) nor the router losses; the real tokens give what they give alone."""
    torch.manual_seed(0)
    model = OneLayer(_config("softmax", k=2))
    model.moe.aux_loss_coef = model.moe.z_loss_coef = 1.0
    x = torch.randn(12, model.moe.router.in_features)
    valid = torch.tensor([True] * 7 + [False] * 5)
    balance.begin_step(model, 7, 1, 7)
    out = model.moe(x, valid)
    padded = balance.end_step(model, World())
    balance.begin_step(model, 7, 1)
    alone = model.moe(x[:7])
    real = balance.end_step(model, World(), 7)
    torch.testing.assert_close(out[:7], alone, rtol=0, atol=1e-6)  # routing is per token
    assert int(padded.tokens.sum()) == 7 * 2
    assert torch.equal(padded.tokens, real.tokens)
    assert padded.aux_loss == pytest.approx(real.aux_loss, rel=1e-6)
    assert padded.z_loss == pytest.approx(real.z_loss, rel=1e-6)
    assert padded.router_logit_max == pytest.approx(real.router_logit_max, rel=1e-6)


def test_packed_training_step_counts_only_real_tokens():
    from camelid.model.transformer import Transformer
    from camelid.train.step import forward_backward

    torch.manual_seed(0)
    config = _config("sigmoid", k=1, shared=1)
    model = Transformer(config).train()
    x = torch.randint(0, config.vocab_size, (2, 16))
    y = x.roll(-1, 1)
    pos = torch.cat([torch.arange(10), torch.arange(6)]).expand(2, 16).clone()
    doc = torch.tensor([[0] * 10 + [1] * 6, [0] * 10 + [-1] * 6])  # row 1 ends in padding
    y[1, 10:] = -100
    forward_backward(model, [(x, y, pos, doc)])
    stats = balance.end_step(model, World())
    assert stats.tokens.sum(-1).tolist() == [26] * config.n_moe_layers  # 32 positions, 6 pads


def test_dpo_rows_count_only_their_own_tokens():
    from functools import partial

    from camelid.model.transformer import Transformer
    from camelid.train.dpo import _logps_head, completion_targets, sequence_logps

    torch.manual_seed(0)
    config = _config("sigmoid", k=1, shared=1)
    model = Transformer(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, 4:12] = 1  # 12 tokens
    mask[1, 3:7] = 1  # 7 tokens, then 5 pads
    balance.begin_step(model, 19, 1, 19)
    logps = sequence_logps(model, ids, mask)
    stats = balance.end_step(model, World())
    assert stats.tokens.sum(-1).tolist() == [19] * config.n_moe_layers
    plain = model(ids, head=partial(_logps_head, targets=completion_targets(ids, mask)))
    torch.testing.assert_close(logps, plain, rtol=0, atol=1e-5)  # the ids change no logp
