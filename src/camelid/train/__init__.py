"""Training: recipe, loop, distribution (FSDP2), checkpoints, stability guard, metrics, report."""
