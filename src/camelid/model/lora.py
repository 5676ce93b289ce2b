"""LoRA adapters on a camelid :class:`~camelid.model.Transformer`, with peft's exact math.

A targeted linear ``W`` computes ``W x + scale * B A dropout(x)`` with ``A`` (r, in) drawn
kaiming-uniform (a = sqrt(5)), ``B`` (out, r) zeros, ``scale = alpha / r`` (rsLoRA off) and the
dropout on the adapter's input only: peft's ``LoraLayer`` rules, so an adapter trained here is
the one peft would have trained. Targets are named as peft names Llama's modules (q_proj ...
down_proj). camelid fuses q, k and v into one ``wqkv``; each targeted projection keeps its own
(A, B, dropout) writing into its row slice of the fused output, which is exactly peft's
per-projection LoRA. Only nn code here: the peft file format lives in
:mod:`camelid.weights.lora`.

    model = apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj")))
    opt = torch.optim.AdamW(lora_parameters(model))     # the base is frozen
    with adapters_disabled(model): ref = model(tokens)  # DPO's reference: the base alone
    model = merge_lora(model)                           # a plain Transformer again
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# model/ imports nothing of camelid but config, which re-exports the error its checks raise.
from camelid.config import ConfigError
from camelid.model.moe import SwiGLU
from camelid.model.transformer import Attention, FeedForward, Transformer

# peft's names for Llama's linears, in HF's order within a layer.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# camelid's FFN linears under peft's names (dense FFN and MoE shared expert alike).
_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class LoraConfig:
    """Rank ``r``, ``alpha`` (scale = alpha / r), ``dropout`` on the adapter input, and the
    ``target_modules`` by peft's names (:data:`TARGETS`). peft's defaults for Llama."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        object.__setattr__(self, "target_modules", tuple(dict.fromkeys(targets)))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r: must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha: must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(f"lora target_modules: empty; valid: {', '.join(TARGETS)}")
        unknown = [t for t in self.target_modules if t not in TARGETS]
        if unknown:
            raise ConfigError(
                f"lora target_modules: unknown {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Linear):
    """A frozen linear plus LoRA adapters, one per targeted projection, each adding
    ``scale * B A dropout(x)`` to the output rows ``slices[name]``. It keeps the base's very
    ``weight``/``bias`` parameters under their own names, so a wrapped model's base tensors
    are named (saved, hashed) as before and only ``lora_A.*``/``lora_B.*`` are new."""

    def __init__(
        self, base: nn.Linear, slices: Mapping[str, tuple[int, int]], config: LoraConfig
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = dict(slices)
        self.scaling = config.scaling
        self.enabled = True
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ModuleDict(
            {n: nn.Linear(self.in_features, config.r, bias=False, **kw) for n in self.slices}
        )
        self.lora_B = nn.ModuleDict(  # B is (out rows, r), as nn.Linear(r, rows) holds it
            {n: nn.Linear(config.r, b - a, bias=False, **kw) for n, (a, b) in self.slices.items()}
        )
        self.lora_dropout = nn.ModuleDict(
            {
                n: nn.Dropout(config.dropout) if config.dropout else nn.Identity()
                for n in self.slices
            }
        )
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """peft's init: A kaiming-uniform (a = sqrt(5)), B zeros, so a new adapter is a no-op."""
        for name in self.slices:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # Every adapter of this linear in two matmuls, whatever their number: the inputs'
        # A x side by side (one matmul for all the A's when there is no dropout, as the
        # adapters then share their input), then y + scale * (A x) B^T in one addmm, B placed
        # in the output rows each adapter writes. The same sums as one adapter at a time
        # (each output row block reads only its own adapter's r columns; the rest are zeros).
        names = list(self.slices)
        if all(isinstance(self.lora_dropout[n], nn.Identity) for n in names):
            a_weight = self._stacked("A", names)
            ax = F.linear(x, a_weight)
        else:  # each adapter draws its own dropout mask on the input, in peft's order
            ax = torch.cat([self.lora_A[n](self.lora_dropout[n](x)) for n in names], dim=-1)
        b_weight = self._stacked("B", names)
        y2 = torch.addmm(
            y.reshape(-1, self.out_features),
            ax.reshape(-1, ax.shape[-1]),
            b_weight.t(),
            alpha=self.scaling,
        )
        return y2.view(y.shape)

    def _stacked(self, which: str, names: list[str]) -> torch.Tensor:
        """A: the adapters' A weights stacked, (n * r, in). B: (out, n * r), adapter i's B in
        its output rows and columns i * r.. (i + 1) * r, zeros elsewhere."""
        if which == "A":
            weights = [self.lora_A[n].weight for n in names]
            return weights[0] if len(weights) == 1 else torch.cat(weights)
        weights = [self.lora_B[n].weight for n in names]
        if len(names) == 1 and self.slices[names[0]] == (0, self.out_features):
            return weights[0]
        r = weights[0].shape[1]
        k = r * len(names)
        blocks, row = [], 0
        for (a, b), col, w in sorted(
            zip((self.slices[n] for n in names), range(len(names)), weights, strict=True),
            key=lambda item: item[0],
        ):
            if a > row:  # rows no adapter writes
                blocks.append(w.new_zeros(a - row, k))
            blocks.append(F.pad(w, (col * r, k - (col + 1) * r)))
            row = b
        if row < self.out_features:
            blocks.append(weights[0].new_zeros(self.out_features - row, k))
        return torch.cat(blocks)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B A`` placed in the rows each adapter writes (out, in), in fp32."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for name, (a, b) in self.slices.items():
            B = self.lora_B[name].weight.float()
            A = self.lora_A[name].weight.float()
            delta[a:b] += (B @ A) * self.scaling
        return delta

    def extra_repr(self) -> str:
        r = next(iter(self.lora_A.values())).out_features
        return f"{super().extra_repr()}, lora r={r}, scale={self.scaling:g}, {list(self.slices)}"


def targets_of(module: nn.Module, config: LoraConfig) -> list[tuple[str, dict]]:
    """The linears of one camelid module that ``config`` targets: (attribute, {peft name:
    output rows}). Attention's fused ``wqkv`` holds q, k, v in that row order."""
    wanted = set(config.target_modules)
    if isinstance(module, Attention):
        q = module.n_heads * module.head_dim
        kv = module.n_kv_heads * module.head_dim
        rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        out = []
        qkv = {n: r for n, r in rows.items() if n in wanted}
        if qkv:
            out.append(("wqkv", qkv))
        if "o_proj" in wanted:
            out.append(("wo", {"o_proj": (0, module.wo.out_features)}))
        return out
    if isinstance(module, FeedForward | SwiGLU):
        return [
            (attr, {peft: (0, getattr(module, attr).out_features)})
            for attr, peft in _FFN.items()
            if peft in wanted
        ]
    return []


def apply_lora(
    model: Transformer, config: LoraConfig, generator: torch.Generator | None = None
) -> Transformer:
    """Wrap the targeted linears of ``model`` (in place) with fresh adapters and freeze
    everything else: afterwards only the adapters require grad. A target that matches no
    module of this model (e.g. gate_proj on an MoE model without dense or shared FFNs) is an
    error naming it."""
    if lora_modules(model):
        raise ConfigError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    for p in model.parameters():
        p.requires_grad_(False)
    found: set[str] = set()
    for module in list(model.modules()):
        for attr, slices in targets_of(module, config):
            base = getattr(module, attr)
            wrapped = LoraLinear(base, slices, config)
            if generator is not None:
                wrapped.reset_lora(generator)
            setattr(module, attr, wrapped)
            found.update(slices)
    missing = [t for t in config.target_modules if t not in found]
    if missing:
        raise ConfigError(
            f"lora target_modules: {', '.join(map(repr, missing))} match no module of this "
            f"model; it has {', '.join(t for t in TARGETS if t in found) or 'none of them'}"
        )
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.lora_config = config
    return model


def is_lora_name(name: str) -> bool:
    """Whether a parameter (or state-dict key) name is an adapter's."""
    return ".lora_A." in name or ".lora_B." in name


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name → the LoRA-wrapped linear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters: what the optimizer trains."""
    return [p for _, p in lora_named_parameters(model)]


def lora_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, module in lora_modules(model).items():
        for sub, p in module.named_parameters():
            if sub.startswith(("lora_A.", "lora_B.")):
                yield f"{name}.{sub}", p


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, by camelid name (``layers.0.attention.wqkv.lora_A.q_proj.weight``):
    what a LoRA run's checkpoint holds; the frozen base is not in it."""
    return {name: p.detach() for name, p in lora_named_parameters(model)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (DPO's reference): every adapter off inside the block."""
    modules = list(lora_modules(model).values())
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before, strict=True):
            m.enabled = was


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (``W += scale * B A``, computed in fp32) and
    put plain linears back, in place: the result is an ordinary Transformer (its base weights
    now the merged ones) that saves, hashes and serves like any other. A disabled adapter is
    dropped unmerged."""
    for name, module in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if module.enabled:
            w = module.weight
            w.copy_((w.float() + module.delta_weight()).to(w.dtype))
        plain = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        plain.weight, plain.bias = module.weight, module.bias
        setattr(parent, attr, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def ineffective_adapters(
    model: nn.Module, before: Mapping[str, torch.Tensor] | None = None
) -> list[str]:
    """The adapters that provably change nothing: ``B`` all zeros or ``scale * B A`` exactly
    zero, or (given ``before``, :func:`lora_state_dict` at the start of a run) A and B both
    bit-identical to their starting values, i.e. training never moved them. Named as
    ``module.peft_name`` (``layers.0.attention.wqkv.q_proj``)."""
    bad = []
    for name, module in lora_modules(model).items():
        for peft in module.slices:
            A, B = module.lora_A[peft].weight, module.lora_B[peft].weight
            zero = not bool(B.any()) or not bool((B.float() @ A.float()).any())
            keys = [f"{name}.lora_{x}.{peft}.weight" for x in ("A", "B")]
            unmoved = (
                before is not None
                and all(k in before for k in keys)
                and all(
                    torch.equal(before[k].to(t.device), t)
                    for k, t in zip(keys, (A, B), strict=True)
                )
            )
            if zero or unmoved:
                bad.append(f"{name}.{peft}")
    return bad


def check_adapters_effective(before: Mapping[str, torch.Tensor] | None, model: nn.Module) -> None:
    """Fail a LoRA run whose adapters provably have no effect (see :func:`ineffective_adapters`):
    a run that trained nothing must not pass as fine-tuned. ``before``: the adapters' state at
    the start (:func:`lora_state_dict`), or None to check the zero delta only."""
    if not lora_modules(model):
        raise ConfigError("check_adapters_effective: the model has no LoRA adapters")
    bad = ineffective_adapters(model, before)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ConfigError(
            f"LoRA adapters with no effect on the model (B or B·A all zeros, or unchanged by "
            f"training): {', '.join(bad[:3])}{more}"
        )
