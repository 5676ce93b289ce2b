"""Learning-rate schedules: linear warm-up, then cosine, WSD or constant."""

from __future__ import annotations

import math

from camelid.train.recipe import Recipe


def lr_at(step: int, recipe: Recipe) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``recipe.train.steps``."""
    peak, floor = recipe.optim.lr, recipe.optim.min_lr
    total, warmup = recipe.train.steps, recipe.schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    kind = recipe.schedule.kind
    if kind == "constant":
        return peak
    if kind == "cosine":
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD (warmup-stable-decay): hold the peak, then decay linearly over the last fraction.
    decay_steps = max(round(total * recipe.schedule.decay_fraction), 1)
    decay_start = total - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min((step - decay_start + 1) / decay_steps, 1.0)
