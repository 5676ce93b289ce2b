"""The stability guard: catch non-finite and spiking losses before they reach the weights.

A step is bad when its loss or gradient norm is not finite, or when its loss is a spike: a
robust z-score ``(loss - median) / (1.4826 · MAD)`` (MAD floored at 0.5% of the median) over
the last ``window`` good losses above ``z_threshold``. A bad step's update is skipped. After
``max_bad_steps`` bad steps in a row the trainer rolls back to the last good checkpoint and
skips the data window that caused them.

Mixture-of-experts models add two alarms (:meth:`Guard.experts`): a router whose max |logit|
passes ``router_logit_limit`` makes the step bad, exactly like a loss spike; an expert that got
no token for ``dead_expert_steps`` steps in a row is a warning (the bias balancing or the aux
loss should revive it; the training goes on).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from camelid.train.recipe import GuardSection


@dataclass
class Alarm:
    """A MoE alarm: ``bad`` ones make the step bad (update skipped, roll-back streak), the
    others are warnings (an event and a console line)."""

    kind: str  # "router_blowup" | "dead_expert"
    detail: str
    bad: bool


class Guard:
    def __init__(self, config: GuardSection) -> None:
        self.config = config
        self.recent: deque[float] = deque(maxlen=config.window)
        self.bad_streak = 0
        self.drills = {int(d.split(":")[1]): d.split(":")[0] for d in config.drill}
        # MoE layer -> steps in a row each of its experts got no token.
        self.dead_runs: dict[int, list[int]] = {}
        # (layer, expert) whose dead_expert alarm fired; re-armed when it gets a token again.
        self.dead_fired: set[tuple[int, int]] = set()
        # The streak before the latest verdict accepted its step (None: it did not) and the
        # loss its append pushed out of a full window, so that a bad MoE alarm on the same step
        # can count that step as bad after all, leaving the history as a bad step leaves it.
        self._accepted_from: int | None = None
        self._evicted: float | None = None

    def drill(self, step: int) -> str | None:
        """The fire drill planned for ``step``, once: "nan" or "spike"."""
        return self.drills.pop(step, None) if self.config.enabled else None

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step (remembered), else why it is bad: "nonfinite" or "spike"."""
        self._accepted_from = None
        if not self.config.enabled:
            return None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "nonfinite"
        elif self._z(loss) > self.config.z_threshold:
            reason = "spike"
        else:
            full = len(self.recent) == self.recent.maxlen
            self._evicted = self.recent[0] if full and self.recent else None
            self.recent.append(loss)
            self._accepted_from, self.bad_streak = self.bad_streak, 0
            return None
        self.bad_streak += 1
        return reason

    def experts(
        self,
        step: int,
        layers: Sequence[int],
        tokens: torch.Tensor | Sequence[Sequence[int]],
        router_logit_max: Sequence[float],
    ) -> list[Alarm]:
        """The MoE alarms of one step: ``tokens[i][e]`` tokens went to expert ``e`` of MoE layer
        ``layers[i]`` and its router's largest |logit| was ``router_logit_max[i]`` (the whole
        step, all ranks, so every rank takes the same decision).

        Call it after :meth:`verdict` for the same step. A ``router_blowup`` (a limit exceeded,
        or a non-finite logit) counts the step as bad even when the verdict passed it: the
        roll-back streak goes on and its loss leaves the spike history; a step the verdict
        already called bad is not counted twice. A ``dead_expert`` fires once per expert when
        its run of token-less steps reaches ``dead_expert_steps``, and again only after the
        expert got a token in between.
        """
        if not self.config.enabled:
            return []
        alarms = []
        limit = self.config.router_logit_limit
        if limit > 0:
            # A NaN logit is over the limit too (the comparison is False).
            over = [(layer, float(v)) for layer, v in zip(layers, router_logit_max, strict=True)
                    if not float(v) <= limit]  # fmt: skip
            if over:
                where = ", ".join(f"layer {layer} {v:.4g}" for layer, v in over)
                detail = (f"max |router logit| {where} > guard.router_logit_limit {limit:g}; "
                          "update skipped")  # fmt: skip
                alarms.append(Alarm("router_blowup", detail, True))
                self._count_bad()
        need = self.config.dead_expert_steps
        if need > 0:
            rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
            for layer, row in zip(layers, rows, strict=True):
                runs = self.dead_runs.get(layer)
                if runs is None or len(runs) != len(row):
                    runs = self.dead_runs[layer] = [0] * len(row)
                died = []
                for e, count in enumerate(row):
                    if count > 0:
                        runs[e] = 0
                        self.dead_fired.discard((layer, e))
                        continue
                    runs[e] += 1
                    if runs[e] >= need and (layer, e) not in self.dead_fired:
                        self.dead_fired.add((layer, e))
                        died.append(e)
                if died:
                    which = ", ".join(str(e) for e in died)
                    detail = (f"layer {layer}: expert{'s' if len(died) > 1 else ''} {which} got "
                              f"no token in the last {need} steps (to step {step})")  # fmt: skip
                    alarms.append(Alarm("dead_expert", detail, False))
        return alarms

    def _count_bad(self) -> None:
        if self._accepted_from is not None:  # the verdict passed this step: take that back
            self.recent.pop()
            if self._evicted is not None:
                self.recent.appendleft(self._evicted)
            self.bad_streak = self._accepted_from + 1
            self._accepted_from = None

    @property
    def must_roll_back(self) -> bool:
        limit = self.config.max_bad_steps
        return limit > 0 and self.bad_streak >= limit

    def _z(self, loss: float) -> float:
        if len(self.recent) < self.config.min_history:
            return 0.0
        values = sorted(self.recent)
        median = values[len(values) // 2]
        mad = sorted(abs(v - median) for v in values)[len(values) // 2]
        # The floor keeps a run of near-identical losses from making every wobble a "spike".
        return (loss - median) / max(1.4826 * mad, 0.005 * abs(median), 1e-6)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready (trainer.json): layer numbers become strings there."""
        return {
            "recent": list(self.recent),
            "bad_streak": self.bad_streak,
            "drills": self.drills,
            "dead_runs": {str(layer): list(runs) for layer, runs in self.dead_runs.items()},
            "dead_fired": sorted([layer, e] for layer, e in self.dead_fired),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also a state saved before the MoE alarms existed (no dead_* keys): no streaks."""
        self.recent = deque(state["recent"], maxlen=self.config.window)
        self.bad_streak = int(state["bad_streak"])
        self.drills = {int(k): v for k, v in state["drills"].items()}
        self.dead_runs = {int(k): [int(n) for n in v]
                          for k, v in state.get("dead_runs", {}).items()}  # fmt: skip
        self.dead_fired = {(int(layer), int(e)) for layer, e in state.get("dead_fired", [])}
        self._accepted_from = None
