"""The mixture-of-experts FFN (Llama 4 and Mixtral routing), with grouped expert matmuls.

Each token's router logits ``x @ W_r`` are computed in fp32 and scored: ``sigmoid`` (Llama 4:
the chosen expert's score scales the expert's INPUT; SwiGLU is not homogeneous, so this is not
the same as scaling its output) or ``softmax`` (Mixtral: the top-k probabilities, renormalised to
sum to one, scale the expert OUTPUTS). Shared experts run on every token and are added.

The routed work is done once for all experts: the (token, expert) pairs are sorted by expert and
every expert's rows go through one grouped matrix multiply, ``torch._grouped_mm`` where the device
supports it, else one batched matmul over rows padded to the busiest expert's count. Neither has
a Python loop over experts. Expert weights are stored as HF Llama 4 stores them, ``[in, out]``:
``w13`` [E, dim, 2F] (gate half first, then up) and ``w2`` [E, F, dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from camelid.config import ModelConfig

GroupedImpl = Literal["auto", "grouped_mm", "bmm"]


class SwiGLU(nn.Module):
    """``w2(silu(w1(x)) * w3(x))`` without biases: the shared expert (HF ``shared_expert``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """``n_experts`` SwiGLU experts held as two stacked weights, run as grouped matmuls."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts, self.dim, self.hidden = n_experts, dim, hidden
        self.w13 = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        impl: GroupedImpl = "auto",
        weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """SwiGLU of rows ``x`` (M, dim) sorted by expert, ``counts[e]`` rows for expert e.

        ``weights`` (w13, w2) replaces the module's own: under expert parallelism, this rank's
        slice of the experts (``counts`` then has one entry per local expert)."""
        w13, w2 = weights if weights is not None else (self.w13, self.w2)
        if impl == "auto":
            impl = "grouped_mm" if grouped_mm_supported(x, w13, w2) else "bmm"
        if impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(x, w13, offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, w2, offs=offs)
        return self._padded_bmm(x, counts, w13, w2)

    def _padded_bmm(
        self, x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """Scatter each expert's rows into an (E, C, dim) block, C the busiest expert's count,
        and run one bmm per projection. Padding rows are zero and are never read back."""
        E, M = w13.shape[0], x.shape[0]
        capacity = int(counts.max()) if M else 0
        starts = counts.cumsum(0) - counts
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
        slot = torch.arange(M, device=x.device) - starts[expert]
        blocks = x.new_zeros(E, capacity, self.dim).index_put((expert, slot), x)
        gate, up = torch.bmm(blocks, w13).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, w2)[expert, slot]


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs these operands: on CUDA it needs bf16 and sm90+; on
    CPU (torch 2.13) it takes fp32 and bf16 but every stride must be a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    tensors = (x, *weights)
    if any(t.dtype != x.dtype for t in tensors):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False  # torch 2.13's meta kernel (what compile traces with) takes bf16 only
    size = x.element_size()
    return all(t.shape[-1] * size % 16 == 0 for t in tensors) and all(
        t.is_contiguous() for t in tensors
    )


class _AddLossGrad(torch.autograd.Function):
    """Identity on ``out``; in backward, also sends ``scale`` as the gradient of ``loss``.

    This is how a layer's router losses join the training objective without the model returning
    them: the gradient of ``scale * loss`` flows into the router as if it had been added to the
    step's loss, under activation checkpointing and ``torch.compile`` alike.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_out, torch.full_like(loss, ctx.scale), None


@dataclass(frozen=True)
class ExpertParallel:
    """This layer's routed experts split over a process group of ``size`` ranks: rank r holds
    experts ``r * E / size`` up to ``(r + 1) * E / size`` (``experts.w13`` / ``w2`` are then
    DTensors sharded along dim 0). Set by ``camelid.train.parallelize``; the model never makes
    a process group itself."""

    group: Any  # a torch.distributed ProcessGroup
    size: int


class MoE(nn.Module):
    """The MoE FFN of one layer: router, routed experts, shared experts.

    ``selection_bias`` (E, fp32, zeros) is added to the scores for the top-k SELECTION only, never
    to the gate values (DeepSeek-V3's aux-loss-free balancing adjusts it between steps; it is
    part of the model, saved and exported with it).
    ``impl`` picks the grouped matmul ("auto": ``torch._grouped_mm`` where supported).

    In training mode every forward adds to accumulators the trainer reads and clears once per
    optimizer step (:mod:`camelid.train.balance`): ``tokens_seen`` (E, int64, the tokens
    routed to each expert), ``logit_absmax`` (the largest |router logit|), and the unscaled
    sums of the router losses, ``aux_sum`` and ``z_sum``. Those losses are on when
    ``aux_loss_coef`` / ``z_loss_coef`` are above zero: ``loss_scale`` (set by the trainer)
    turns their per-token sums into the step's normalised objective (see ``_router_losses``).
    A forward recomputed by activation checkpointing adds again; the trainer divides that out.

    ``expert_parallel`` (None: every expert is local) says how the experts are split over ranks.
    """

    expert_parallel: ExpertParallel | None = None
    aux_group: Any = None  # the ranks the auxiliary loss measures the balance over (None: this)

    def __init__(self, config: ModelConfig, impl: GroupedImpl = "auto") -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.n_experts_per_tok
        self.scoring = config.router_scoring
        self.impl: GroupedImpl = impl
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)  # HF router: [E, D]
        self.experts = Experts(config.n_experts, config.dim, config.moe_ffn_dim)
        # n shared SwiGLU experts of width F summed == one SwiGLU of width n * F.
        self.shared = (
            SwiGLU(config.dim, config.n_shared_experts * config.moe_ffn_dim)
            if config.n_shared_experts
            else None
        )
        self.register_buffer("selection_bias", torch.zeros(config.n_experts, dtype=torch.float32))
        E = config.n_experts
        self.register_buffer("tokens_seen", torch.zeros(E, dtype=torch.long), persistent=False)
        for name in ("logit_absmax", "aux_sum", "z_sum"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float32), persistent=False)
        self.aux_loss_coef = 0.0
        self.z_loss_coef = 0.0
        self.loss_scale = 0.0
        self.step_local_tokens: int | None = None  # this rank's real tokens in the step

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts (N, k) and their gate values (N, k, fp32) for tokens ``x`` (N, dim)."""
        chosen, gates, _, _ = self._route(x)
        return chosen, gates

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``route`` plus the router's fp32 logits and scores (N, E), for the router losses."""
        logits = F.linear(x.float(), self.router.weight.float())  # the router runs in fp32
        scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else logits.softmax(-1)
        chosen = torch.topk(scores.detach() + self.selection_bias, self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.scoring == "softmax":
            gates = gates / gates.sum(-1, keepdim=True)
        return chosen, gates, logits, scores

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (N,) bool, when given, marks the real tokens of ``x`` (packed training
        rows pad with tokens nothing reads): padding is routed like any token, but only real
        tokens count in the load statistics (hence the selection-bias update) and the router
        losses."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, gates, logits, scores = self._route(x)
        out, counts = self.routed(x, chosen, gates)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            weight = None  # 1 for a real token, 0 for padding (no boolean indexing: compile)
            if valid is not None:
                weight = valid.reshape(-1, 1).to(logits.dtype)
                pairs = weight.expand(-1, self.top_k).reshape(-1)
                counts = torch.bincount(chosen.reshape(-1), pairs, self.n_experts).round().long()
            with torch.no_grad():
                self.tokens_seen.add_(counts)
                top = logits.abs() if weight is None else logits.abs() * weight
                self.logit_absmax.copy_(torch.maximum(self.logit_absmax, top.amax()))
            if self.aux_loss_coef > 0 or self.z_loss_coef > 0:
                loss = self._router_losses(logits, scores, counts, weight)
                out = _AddLossGrad.apply(out, loss, self.loss_scale)
        return out.view(shape)

    def _router_losses(
        self,
        logits: torch.Tensor,
        scores: torch.Tensor,
        counts: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The router losses of this forward's N tokens, as a SUM over tokens (weighted by the
        coefficients), so a step's objective is this summed over its micro-batches and ranks
        times ``loss_scale`` (the world size / (the step's tokens x the MoE layers)):

        - z-loss (ST-MoE): ``logsumexp(logits)^2`` per token, a mean over the step's tokens;
        - Switch auxiliary loss: ``E * sum_e f_e * P_e`` over this micro-batch's tokens on every
          rank (``aux_group``: the counts are summed over it, so any number of ranks sharing a
          global micro-batch gives the same loss), ``f_e`` the share of the (token, choice)
          pairs routed to expert e and ``P_e`` the mean of its normalised score; this rank's
          part is ``E * sum_e f_e * (its tokens' scores summed)``. Each micro-batch counts by
          its share of the step's tokens.

        ``weight`` (N, 1): 1 for the real tokens, 0 for padding, which then adds nothing.
        """
        total = logits.new_zeros(())
        if self.z_loss_coef > 0:
            z = torch.logsumexp(logits, dim=-1, keepdim=True).square()
            z = (z if weight is None else z * weight).sum()
            self.z_sum.add_(z.detach())
            total = total + self.z_loss_coef * z
        if self.aux_loss_coef > 0:
            probs = scores / scores.sum(-1, keepdim=True)  # sigmoid scores normalised too
            if weight is not None:
                probs = probs * weight
            pairs = counts.to(probs.dtype)
            if self.aux_group is not None:
                pairs = pairs.clone()
                dist.all_reduce(pairs, group=self.aux_group)
            share = pairs / pairs.sum().clamp(min=1.0)
            aux = self.n_experts * (share * probs.sum(0)).sum()
            self.aux_sum.add_(aux.detach())
            total = total + self.aux_loss_coef * aux
        return total

    def routed(
        self, x: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' summed output for tokens ``x`` (N, dim) and the tokens each
        expert received (E,): pairs sorted by expert, one grouped matmul, added back per token."""
        N, k = x.shape[0], self.top_k
        flat = chosen.reshape(-1)  # (N * k,) expert of each (token, choice) pair
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // k  # the token of each sorted pair
        gate = gates.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        rows = x[token]
        if self.scoring == "sigmoid":  # Llama 4: the gate scales the expert's input
            rows = rows * gate
        if self.expert_parallel is None:
            y = self.experts(rows, counts, self.impl)
        else:
            y = self._dispatched(rows, counts, self.expert_parallel)
        if self.scoring == "softmax":
            y = y * gate
        return x.new_zeros(N, x.shape[-1]).index_add(0, token, y), counts

    def _dispatched(
        self, rows: torch.Tensor, counts: torch.Tensor, ep: ExpertParallel
    ) -> torch.Tensor:
        """The experts' output for ``rows`` (sorted by expert, ``counts`` (E,) of them per
        expert) when the experts live on ``ep.size`` ranks: each row goes to the rank holding
        its expert, runs there in one grouped matmul with that rank's experts, and comes back
        in the order it left. Every rank of the group must call this, in the same layer order.

        Two all-to-alls out (the per-expert counts, then the rows) and one back; the row
        exchanges are autograd-aware, so backward runs the same exchanges in reverse."""
        import torch.distributed as dist
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        W, L = ep.size, self.n_experts // ep.size
        # received[s, l]: rows rank s sends to this rank's local expert l.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=ep.group)
        received = received.view(W, L)
        send = counts.view(W, L).sum(1).tolist()  # rows sorted by expert: grouped by rank too
        recv = received.sum(1).tolist()
        inbound = all_to_all_single_autograd(rows.contiguous(), recv, send, ep.group)
        # They arrive by source rank, then by local expert: regroup them by local expert.
        local = torch.arange(L, device=rows.device).repeat(W)
        expert = torch.repeat_interleave(local, received.reshape(-1), output_size=sum(recv))
        by_expert = torch.argsort(expert, stable=True)
        # This rank's experts, in the rows' dtype (FSDP2's mixed precision does not cast them).
        weights = (self.experts.w13.to_local().to(rows.dtype),
                   self.experts.w2.to_local().to(rows.dtype))  # fmt: skip
        out = self.experts(inbound[by_expert], received.sum(0), self.impl, weights=weights)
        out = torch.empty_like(out).index_copy(0, by_expert, out)  # back to arrival order
        return all_to_all_single_autograd(out, send, recv, ep.group)
