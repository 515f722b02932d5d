"""r3gan's stage layout (widths and 3x3-conv groups per stage) from the `model.*` keys, and its refusals.

Torch-free and apart from `rgan_dist.models` so that `load_config` refuses a bad layout before any process
starts (a config check must not import torch), while `models.r3gan` builds from the very same answer.
"""

from __future__ import annotations

import math
from typing import Any

from rgan_dist.errors import ConfigError

__all__ = ["r3gan_layout"]

_R3GAN_ONLY = {"stage_widths": [], "stage_blocks": 2, "cardinality": 0, "expansion": 2}


def r3gan_layout(*, arch: str, resolution: int, width: int, max_width: int, spectral_norm: bool,
                 stage_widths: list[int], stage_blocks: int, cardinality: int, expansion: int,
                 **_: Any) -> tuple[list[int], list[int]]:
    """r3gan's (widths, cardinalities) per stage, 4x4 first; ([], []) for the other archs, which must leave the
    r3gan-only keys at their defaults. Auto cardinality is width / 8 (R3GAN's presets: 8 input, 16 expanded
    channels per group); for a width not divisible by 8, gcd(width, width // 8), which always divides it."""
    if arch != "r3gan":
        given = {"stage_widths": stage_widths, "stage_blocks": stage_blocks, "cardinality": cardinality,
                 "expansion": expansion}
        for key, default in _R3GAN_ONLY.items():
            if given[key] != default:
                raise ConfigError(f"model.{key}={given[key]!r}: only used with model.arch=r3gan (got {arch})")
        return [], []
    if resolution < 8 or resolution & (resolution - 1):
        raise ConfigError(f"model.resolution={resolution}: r3gan needs a power of two in 8..1024")
    if spectral_norm:
        raise ConfigError("model.spectral_norm=true: r3gan has no normalisation (R3GAN's design); set false")
    n = resolution.bit_length() - 2  # stages at 4, 8, ..., resolution
    widths = list(stage_widths) or [min(width * (resolution >> (i + 2)), max_width) for i in range(n)]
    if len(widths) != n or min(widths) < 1:
        raise ConfigError(f"model.stage_widths={stage_widths}: r3gan at {resolution}px needs {n} positive widths "
                          "(4x4 first), or [] for auto")
    cards = [cardinality] * n if cardinality else [math.gcd(w, max(1, w // 8)) for w in widths]
    bad = [w for w, c in zip(widths, cards, strict=True) if w % c]
    if bad:
        raise ConfigError(f"model.cardinality={cardinality}: must divide every r3gan stage width {widths} "
                          f"(not {bad[0]}); 0 picks width / 8 per stage")
    return widths, cards
