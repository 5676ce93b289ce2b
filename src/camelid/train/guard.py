"""The stability guard: catch non-finite and spiking losses before they reach the weights.

A step is bad when its loss or gradient norm is not finite, or when its loss is a spike: a
robust z-score ``(loss - median) / (1.4826 · MAD)`` (MAD floored at 0.5% of the median) over
the last ``window`` good losses above ``z_threshold``. A bad step's update is skipped. After
``max_bad_steps`` bad steps in a row the trainer rolls back to the last good checkpoint and
skips the data window that caused them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from camelid.train.recipe import GuardSection


class Guard:
    def __init__(self, config: GuardSection) -> None:
        self.config = config
        self.recent: deque[float] = deque(maxlen=config.window)
        self.bad_streak = 0
        self.drills = {int(d.split(":")[1]): d.split(":")[0] for d in config.drill}

    def drill(self, step: int) -> str | None:
        """The fire drill planned for ``step``, once: "nan" or "spike"."""
        return self.drills.pop(step, None) if self.config.enabled else None

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step (remembered), else why it is bad: "nonfinite" or "spike"."""
        if not self.config.enabled:
            return None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "nonfinite"
        elif self._z(loss) > self.config.z_threshold:
            reason = "spike"
        else:
            self.recent.append(loss)
            self.bad_streak = 0
            return None
        self.bad_streak += 1
        return reason

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
        return {"recent": list(self.recent), "bad_streak": self.bad_streak, "drills": self.drills}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.config.window)
        self.bad_streak = int(state["bad_streak"])
        self.drills = {int(k): v for k, v in state["drills"].items()}
