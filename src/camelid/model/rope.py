"""Rotary position embeddings in the Hugging Face layout (rotate-half pairing).

Meta's reference code rotates adjacent pairs (2i, 2i+1); Hugging Face checkpoints have the rows
of q_proj and k_proj permuted so that pairing (i, i + d/2) gives the same logits. camelid uses
the HF layout, so HF checkpoints load without any permutation.
"""

from __future__ import annotations

import math

import torch

from camelid.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair angular frequencies θ^(-2i/d) in fp32 on the CPU, with Llama 3.1 scaling if set.

    Always a real CPU tensor, even inside ``with torch.device("meta")``.
    """
    d = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)
    )
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    if s.high_freq_factor > s.low_freq_factor:  # a smooth band exists between the two cut-offs
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape positions.shape + (head_dim // 2,), computed in fp32 then cast."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., T, heads, head_dim) by position; cos/sin broadcast as (..., T, 1, d/2).

    Equal to HF's ``x * cos + rotate_half(x) * sin`` with cos/sin duplicated over both halves,
    but multiplies each half once.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
