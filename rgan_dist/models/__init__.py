"""Generator/discriminator pairs, built by name so configs and the engine never import a class.

`build_models` is the one door: it validates every size (a bad one is a `ConfigError` naming the
`model.*` key), builds G and D already initialised the paper's way, and leaves device placement,
memory format and wrapping (DDP/DeepSpeed) to the strategy.

Contract the engine relies on: G(z [B, z_dim]) -> [B, channels, R, R] in [-1, 1] (r3gan: in eval mode; in
training its raw, unsquashed output, as R3GAN's);
D(x [B, channels, R, R]) -> flat fp32 logits [B // pack]. G exposes `z_dim`, `resolution`,
`channels`; D exposes `pack`, `resolution`, `channels`. Both expose `arch`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from rgan_dist.errors import ConfigError
from rgan_dist.models.cnn32 import CNN32Discriminator, CNN32Generator
from rgan_dist.models.dcgan import DCGANDiscriminator, DCGANGenerator
from rgan_dist.models.layers import check_positive_int
from rgan_dist.models.r3gan import R3GANDiscriminator, R3GANGenerator
from rgan_dist.r3gan_layout import r3gan_layout

if TYPE_CHECKING:
    from rgan_dist.config import ModelConfig

__all__ = ["ARCHS", "DCGAN_RESOLUTIONS", "build_models", "count_parameters", "describe", "forward_flops"]

ARCHS: tuple[str, ...] = ("dcgan", "cnn32", "r3gan")
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
           d_batch_norm: bool = True, pack: int = 1, stage_widths: list[int] | tuple[int, ...] = (),
           stage_blocks: int = 2, cardinality: int = 0, expansion: int = 2) -> tuple[nn.Module, nn.Module]:
    """`spectral_norm` and `d_batch_norm` are independent: the paper's spectral-norm runs had no
    BatchNorm in D, so presets reproducing them set `d_batch_norm=False` as well.

    r3gan has no normalisation: it ignores `g_batch_norm`/`d_batch_norm` (their defaults are dcgan's, and
    refusing them would make every r3gan config spell out two falses) and refuses `spectral_norm=True`
    (off by default, so asking for it is a choice it cannot honour). The four r3gan-only sizes
    (`stage_widths`, `stage_blocks`, `cardinality`, `expansion`) are refused off their defaults elsewhere."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r}: unknown architecture; allowed: {', '.join(ARCHS)}")
    for name, value in (("z_dim", z_dim), ("width", width), ("max_width", max_width),
                        ("channels", channels), ("pack", pack), ("stage_blocks", stage_blocks),
                        ("expansion", expansion), *((f"stage_widths[{i}]", w) for i, w in enumerate(stage_widths))):
        check_positive_int(name, value)
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ConfigError(f"model.resolution={resolution!r}: must be an integer")
    if isinstance(cardinality, bool) or not isinstance(cardinality, int) or cardinality < 0:
        raise ConfigError(f"model.cardinality={cardinality!r}: must be 0 (auto) or a positive integer")
    widths, cards = r3gan_layout(arch=arch, resolution=resolution, width=width, max_width=max_width,
                                 spectral_norm=spectral_norm, stage_widths=list(stage_widths),
                                 stage_blocks=stage_blocks, cardinality=cardinality, expansion=expansion)

    if arch == "r3gan":
        shape = {"resolution": resolution, "channels": channels, "widths": widths, "cardinalities": cards,
                 "blocks": stage_blocks, "expansion": expansion}
        return R3GANGenerator(z_dim=z_dim, **shape), R3GANDiscriminator(pack=pack, **shape)

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


def forward_flops(module: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward per sample of `example` (batch of 2: BatchNorm in training mode needs more than one
    value per channel), counted by torch's FlopCounterMode: 2 x multiply-adds of convs and matmuls (a grouped
    conv counts in_channels / groups per output), elementwise work not included. Runs on meta copies of the
    parameters, buffers and input: nothing is computed and no state (BN statistics, spectral norm's u/v) moves."""
    state = {k: torch.empty_like(v, device="meta")
             for k, v in itertools.chain(module.named_parameters(), module.named_buffers())}
    with FlopCounterMode(display=False) as counter:
        functional_call(module, state, (example.to("meta"),))
    return counter.get_total_flops() / example.shape[0]


def describe(G: nn.Module, D: nn.Module) -> str:
    """One line for the start of a run and the logs, e.g. ``dcgan 64x64x3, z 128 | G 3,806,080 params (3.81M),
    0.21 GFLOP/img | D 2,765,568 params (2.77M), 0.21 GFLOP/img, pack 1`` (forward FLOPs: `forward_flops`)."""
    g, d = count_parameters(G), count_parameters(D)
    arch = getattr(G, "arch", type(G).__name__)
    r, c = getattr(G, "resolution", "?"), getattr(G, "channels", "?")
    sn = any("parametrizations" in name for name, _ in D.named_parameters())
    gf = forward_flops(G, torch.empty(2, G.z_dim, device="meta")) / 1e9
    df = forward_flops(D, torch.empty(2 * D.pack, D.channels, D.resolution, D.resolution, device="meta")) / 1e9
    return (f"{arch} {r}x{r}x{c}, z {getattr(G, 'z_dim', '?')} | G {g:,} params ({g / 1e6:.2f}M), {gf:.3g} GFLOP/img"
            f" | D {d:,} params ({d / 1e6:.2f}M), {df:.3g} GFLOP/img, pack {getattr(D, 'pack', 1)}"
            f"{', spectral norm' if sn else ''}")
