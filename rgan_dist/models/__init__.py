"""Generator/discriminator pairs, built by name so configs and the engine never import a class.

`build_models` is the one door: it validates every size (a bad one is a `ConfigError` naming the
`model.*` key), builds G and D already initialised the paper's way, and leaves device placement,
memory format and wrapping (DDP/DeepSpeed) to the strategy.

Contract the engine relies on: G(z [B, z_dim]) -> [B, channels, R, R] in [-1, 1];
D(x [B, channels, R, R]) -> flat fp32 logits [B // pack]. G exposes `z_dim`, `resolution`,
`channels`; D exposes `pack`, `resolution`, `channels`. Both expose `arch`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import nn

from rgan_dist.errors import ConfigError
from rgan_dist.models.cnn32 import CNN32Discriminator, CNN32Generator
from rgan_dist.models.dcgan import DCGANDiscriminator, DCGANGenerator
from rgan_dist.models.layers import check_positive_int

if TYPE_CHECKING:
    from rgan_dist.config import ModelConfig

__all__ = ["ARCHS", "DCGAN_RESOLUTIONS", "build_models", "count_parameters", "describe"]

ARCHS: tuple[str, ...] = ("dcgan", "cnn32")
DCGAN_RESOLUTIONS: tuple[int, ...] = tuple(2**k for k in range(4, 11))  # 16 .. 1024


def build_models(model: ModelConfig | str, **sizes: Any) -> tuple[nn.Module, nn.Module]:
    """Build (G, D), initialised from the global torch RNG (seed it first for a fixed pair).

    `model` is the config's `model` section (the engine and `rgan eval`: `build_models(cfg.model)`), or an
    architecture name with the sizes as keywords (tests, benchmarks); keywords also override a section's
    fields. The keywords are `model.*`'s: see `_build`."""
    if isinstance(model, str):
        return _build(model, **sizes)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    return _build(**{**fields, **sizes})


def _build(arch: str, *, resolution: int, z_dim: int = 128, width: int = 64, max_width: int = 1024,
           channels: int = 3, spectral_norm: bool = False, g_batch_norm: bool = True,
           d_batch_norm: bool = True, pack: int = 1) -> tuple[nn.Module, nn.Module]:
    """`spectral_norm` and `d_batch_norm` are independent: the paper's spectral-norm runs had no
    BatchNorm in D, so presets reproducing them set `d_batch_norm=False` as well."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r}: unknown architecture; allowed: {', '.join(ARCHS)}")
    for name, value in (("z_dim", z_dim), ("width", width), ("max_width", max_width),
                        ("channels", channels), ("pack", pack)):
        check_positive_int(name, value)
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ConfigError(f"model.resolution={resolution!r}: must be an integer")

    if arch == "dcgan":
        if resolution not in DCGAN_RESOLUTIONS:
            allowed = ", ".join(map(str, DCGAN_RESOLUTIONS))
            raise ConfigError(f"model.resolution={resolution}: dcgan needs a power of two, one of {allowed}")
        G: nn.Module = DCGANGenerator(resolution=resolution, z_dim=z_dim, width=width, max_width=max_width,
                                      channels=channels, batch_norm=g_batch_norm)
        D: nn.Module = DCGANDiscriminator(resolution=resolution, width=width, max_width=max_width,
                                          channels=channels, batch_norm=d_batch_norm,
                                          spectral_norm=spectral_norm, pack=pack)
        return G, D

    if resolution != 32:
        raise ConfigError(f"model.resolution={resolution}: arch cnn32 is the paper's 32x32 CNN; set 32")
    G = CNN32Generator(z_dim=z_dim, width=width, max_width=max_width, channels=channels,
                       batch_norm=g_batch_norm)
    D = CNN32Discriminator(width=width, max_width=max_width, channels=channels, batch_norm=d_batch_norm,
                           spectral_norm=spectral_norm, pack=pack)
    return G, D


def count_parameters(module: nn.Module) -> int:
    """Every parameter, trainable or not: D is frozen during G steps and its size must not change.

    Spectral norm's u/v are buffers, so they are not counted; its raw weight is.
    """
    return sum(p.numel() for p in module.parameters())


def describe(G: nn.Module, D: nn.Module) -> str:
    """One line for the start of a run and the logs, e.g.
    ``dcgan 64x64x3, z 128 | G 3,806,080 params (3.81M) | D 2,765,568 params (2.77M), pack 1``."""
    g, d = count_parameters(G), count_parameters(D)
    arch = getattr(G, "arch", type(G).__name__)
    r, c = getattr(G, "resolution", "?"), getattr(G, "channels", "?")
    sn = any("parametrizations" in name for name, _ in D.named_parameters())
    return (f"{arch} {r}x{r}x{c}, z {getattr(G, 'z_dim', '?')} | G {g:,} params ({g / 1e6:.2f}M) | "
            f"D {d:,} params ({d / 1e6:.2f}M), pack {getattr(D, 'pack', 1)}"
            f"{', spectral norm' if sn else ''}")
