"""Expert balance in MoE training: each step's router accounting and the selection-bias update.

Around every optimizer step (the trainer does this; :func:`camelid.train.step.forward_backward`
calls :func:`begin_step` itself):

    configure(model, aux_loss_coef, z_loss_coef)     # once
    begin_step(model, step_tokens, world_size)       # clears the layers' accumulators
    ... the step's micro-batches, forward and backward ...
    stats = end_step(model, world)                   # loads over all micro-batches and ranks
    update_bias(model, stats.tokens, rate)           # when the step's update is kept

DeepSeek-V3's auxiliary-loss-free balancing moves each expert's selection bias by ±rate from
the load of the *whole* optimizer step (every micro-batch, every rank: the loads are summed
over ranks first, so every rank applies the same update and the biases never diverge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from camelid.model.moe import MoE
from camelid.train.distributed import World, all_reduce_max, all_reduce_sum

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class StepExperts:
    """What the MoE layers did in one optimizer step, over all its micro-batches and ranks."""

    layers: list[int]  # the MoE layers' indices
    tokens: torch.Tensor  # (layers, experts) int64: tokens routed to each expert
    router_logit_max: list[float]  # the largest |router logit| per layer
    aux_loss: float | None  # the Switch auxiliary loss, mean over layers (None: off)
    z_loss: float | None  # the router z-loss, mean over layers (None: off)
    bias_absmax: list[float]  # the largest |selection bias| per layer, before this step's update

    def record(self) -> dict:
        """The JSON-ready fields of a metrics.jsonl "experts" record."""
        return {
            "layers": self.layers,
            "tokens": self.tokens.tolist(),
            "router_logit_max": [round(v, 4) for v in self.router_logit_max],
            "aux_loss": self.aux_loss,
            "z_loss": self.z_loss,
            "bias_absmax": [round(v, 6) for v in self.bias_absmax],
        }


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """The model's MoE FFNs with their layer index (through checkpoint and compile wrappers)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            match = _LAYER_RE.search(name)
            out.append((int(match.group(1)) if match else len(out), module))
    return out


def configure(
    model: nn.Module,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    world: World | None = None,
) -> None:
    """Turn the router losses on (a coefficient above 0) or off in every MoE layer. Under
    torchrun the auxiliary loss measures each micro-batch's balance over all ranks' tokens (a
    sum of the expert counts over the world), so it does not depend on the number of ranks."""
    group = None
    if world is not None and world.distributed:
        import torch.distributed as dist

        group = dist.group.WORLD
    for _, moe in moe_layers(model):
        moe.aux_loss_coef, moe.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        moe.aux_group = group


@torch.no_grad()
def begin_step(
    model: nn.Module, step_tokens: int, world_size: int, local_tokens: int | None = None
) -> None:
    """Clear the accumulators and set the router losses' scale for a step of ``step_tokens``
    tokens (all micro-batches, all ranks; padding not counted). FSDP2 averages gradients over
    ranks, hence the world size: the objective is each layer's loss summed over the step's
    tokens, divided by the step's tokens and the number of MoE layers (a mean over tokens and
    layers). ``local_tokens``, this rank's share, is kept for :func:`end_step`."""
    layers = moe_layers(model)
    for _, moe in layers:
        moe.tokens_seen.zero_()
        for buf in (moe.logit_absmax, moe.aux_sum, moe.z_sum):
            buf.zero_()
        moe.loss_scale = world_size / (max(step_tokens, 1) * len(layers))
        moe.step_local_tokens = local_tokens


@torch.no_grad()
def end_step(model: nn.Module, world: World, local_tokens: int | None = None) -> StepExperts | None:
    """The step's expert loads and router figures, summed (max-ed) over ranks; None for a dense
    model. ``local_tokens``: the real (not padding) tokens this rank routed in the step (each
    MoE layer routes every token ``top_k`` times); by default what :func:`begin_step` was told.
    A forward recomputed by activation checkpointing counted twice; the counts say so exactly
    (a whole multiple of the tokens) and it is divided out."""
    layers = moe_layers(model)
    if not layers:
        return None
    mods = [m for _, m in layers]
    if local_tokens is None:
        local_tokens = mods[0].step_local_tokens
        if local_tokens is None:
            raise ValueError("end_step: local_tokens not given and begin_step was not told")
    device = world.device
    seen = torch.stack([m.tokens_seen for m in mods]).to(device)
    routed = torch.tensor([local_tokens * m.top_k for m in mods], device=device)
    passes = (seen.sum(-1) / routed.clamp(min=1)).round().clamp(min=1).long()
    sums = torch.stack([torch.stack([m.aux_sum, m.z_sum]) for m in mods]).to(device).double()
    sums /= passes.unsqueeze(-1)
    step_tokens = torch.tensor(float(local_tokens), dtype=torch.float64, device=device)
    packed = torch.cat([(seen // passes.unsqueeze(-1)).double().flatten(), sums.flatten(),
                        step_tokens.view(1)])  # fmt: skip
    packed = all_reduce_sum(packed, world)
    L, E = seen.shape
    tokens = packed[: L * E].round().long().view(L, E).cpu()
    sums = packed[L * E : L * E + 2 * L].view(L, 2)
    total = float(packed[-1])
    logit_max = all_reduce_max(torch.stack([m.logit_absmax for m in mods]).to(device), world)
    aux_on, z_on = mods[0].aux_loss_coef > 0, mods[0].z_loss_coef > 0
    per_layer = sums.sum(0) / max(total, 1.0) / L
    return StepExperts(
        layers=[i for i, _ in layers],
        tokens=tokens,
        router_logit_max=[float(v) for v in logit_max.tolist()],
        aux_loss=float(per_layer[0]) if aux_on else None,
        z_loss=float(per_layer[1]) if z_on else None,
        bias_absmax=[float(m.selection_bias.abs().max()) for m in mods],
    )


@torch.no_grad()
def update_bias(model: nn.Module, tokens: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's rule: every expert's selection bias moves by ``rate`` toward the mean
    load of its layer (up when it received fewer tokens than the mean, down when more, not at
    all when exactly the mean). ``tokens``: (layers, experts), the whole step's loads."""
    if rate <= 0:
        return
    for (_, moe), load in zip(moe_layers(model), tokens, strict=True):
        load = load.to(moe.selection_bias.device, torch.float32)
        moe.selection_bias.add_(torch.sign(load.mean() - load), alpha=rate)
