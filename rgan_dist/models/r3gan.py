"""R3GAN's normalisation-free residual pair (Huang et al., NeurIPS 2024, arXiv 2501.05441), written from its
paper and the design of its code (brownvc/R3GAN `R3GAN/Networks.py`).

G: z -> a learned 4x4 basis [w0, 4, 4] scaled per channel by Linear(z -> w0); then one stage per side 4, 8,
.., R: [1x1 conv when the width changes, x2 up-sampling with the [1, 2, 1] filter (bilinear)] (not in the 4x4
stage), then `blocks` residual blocks; a 1x1 conv to `channels` at the end.
D mirrors it: a 1x1 conv from `channels * pack`, then per stage R, .., 8: blocks, /2 down-sampling with the
same filter, 1x1 conv when the width changes; at 4x4: blocks, a 4x4 depthwise conv (the "basis") and
Linear(w0 -> 1).

Residual block: x + conv1x1(act(conv3x3_grouped(act(conv1x1_expand(x))))), act = per-channel bias + leaky
ReLU 0.2. No conv carries a bias of its own, and there is no BatchNorm and no spectral norm.

Initialisation (why the network trains without normalisation): every weight N(0, gain / sqrt(fan_in)), gain 1
except the first two convs of a block, whose gain is leaky ReLU's sqrt(2 / (1 + 0.2^2)) times L^(-1/4), L the
network's total number of blocks (the fix-up rule for 3 layers per block, L^(-1/(2*3-2))); the last conv of
every block starts at zero, so each block is the identity at init and the variance of the trunk does not grow
with depth. G's basis is N(0, 1).

G's output is not squashed by a tanh (R3GAN has none: D sees G's raw output while training). In eval mode G
clamps it to [-1, 1], so every consumer (samples, FID, `rgan export`/`generate`, the MLflow model) gets the
range the other archs promise; `samples.to_uint8` clamps anyway, so pixels are the same either way.

Resampling uses no buffer and no conv: the [1, 3, 3, 1] interpolation kernel (the [1, 2, 1] filter convolved
with the box of the 2x step) is applied as shifted sums of slices, exactly the zero-padded transposed conv /
strided conv of the reference code. A D without buffers lets the engine run reals and fakes in one forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rgan_dist.models.layers import Critic

__all__ = ["LRELU_GAIN", "R3GANDiscriminator", "R3GANGenerator", "downsample2x", "upsample2x"]

LRELU_GAIN = math.sqrt(2 / (1 + 0.2**2))


def msr_init(weight: Tensor, gain: float) -> Tensor:
    """N(0, gain / sqrt(fan_in)) in place; fan_in counts one group's input channels times the kernel area."""
    fan_in = weight.shape[1] * weight[0][0].numel()
    with torch.no_grad():
        return weight.normal_(0.0, gain / math.sqrt(fan_in))


def _conv(c_in: int, c_out: int, k: int = 1, *, gain: float = 1.0, groups: int = 1, same: bool = True) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2 if same else 0, groups=groups, bias=False)
    msr_init(conv.weight, gain)
    return conv


def _along(x: Tensor, dim: int, start: int, stop: int | None, step: int = 1) -> Tensor:
    return x[(slice(None),) * dim + (slice(start, stop, step),)]


def _pad1(x: Tensor, dim: int) -> Tensor:
    return F.pad(x, (1, 1) if dim == 3 else (0, 0, 1, 1))


def upsample2x(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, 2H, 2W]: conv_transpose2d(stride 2, padding 1) with the 4x4 kernel
    outer([1, 3, 3, 1]) / 16, gain 4; per axis out[2m] = (3 x[m] + x[m-1]) / 4, out[2m+1] = (3 x[m] + x[m+1]) / 4,
    zero outside the image."""
    for dim in (2, 3):
        n, p = x.shape[dim], _pad1(x, dim)
        mid = 0.75 * _along(p, dim, 1, n + 1)
        even, odd = mid + 0.25 * _along(p, dim, 0, n), mid + 0.25 * _along(p, dim, 2, n + 2)
        x = torch.stack((even, odd), dim=dim + 1).flatten(dim, dim + 1)
    return x


def downsample2x(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, H/2, W/2]: conv2d(stride 2, padding 1) with outer([1, 3, 3, 1]) / 64; per axis
    out[m] = (x[2m-1] + 3 x[2m] + 3 x[2m+1] + x[2m+2]) / 8, zero outside the image."""
    for dim in (2, 3):
        n, p = x.shape[dim] // 2, _pad1(x, dim)
        taps = [_along(p, dim, j, j + 2 * n, 2) for j in range(4)]
        x = (taps[0] + taps[3] + 3.0 * (taps[1] + taps[2])) * 0.125
    return x


class BiasAct(nn.Module):
    """Per-channel bias then leaky ReLU 0.2 (the convs themselves have no bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2)


class ResidualBlock(nn.Module):
    """x + 1x1(act(3x3 grouped(act(1x1 expand(x))))); the last 1x1 starts at zero: the identity at init."""

    def __init__(self, width: int, cardinality: int, expansion: int, gain: float) -> None:
        super().__init__()
        wide = width * expansion
        self.expand, self.act1 = _conv(width, wide, gain=gain), BiasAct(wide)
        self.mix, self.act2 = _conv(wide, wide, 3, gain=gain, groups=cardinality), BiasAct(wide)
        self.project = _conv(wide, width, gain=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.act2(self.mix(self.act1(self.expand(x)))))


def _blocks(width: int, cardinality: int, n: int, expansion: int, gain: float) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(width, cardinality, expansion, gain) for _ in range(n)))


def _block_gain(stages: int, blocks: int) -> float:
    return LRELU_GAIN * (stages * blocks) ** -0.25


class R3GANGenerator(nn.Module):
    """z [B, z_dim] -> images [B, channels, R, R]; unbounded in training, clamped to [-1, 1] in eval mode."""

    arch = "r3gan"

    def __init__(self, *, resolution: int, z_dim: int, channels: int, widths: list[int], cardinalities: list[int],
                 blocks: int, expansion: int) -> None:
        super().__init__()
        self.resolution, self.z_dim, self.channels = resolution, z_dim, channels
        gain = _block_gain(len(widths), blocks)
        self.basis = nn.Parameter(torch.randn(widths[0], 4, 4))
        self.to_basis = nn.Linear(z_dim, widths[0], bias=False)
        msr_init(self.to_basis.weight, 1.0)
        self.stages = nn.ModuleList()
        for i, (w, card) in enumerate(zip(widths, cardinalities, strict=True)):
            stage = nn.Module()
            if i:  # the transition into a stage: 1x1 conv only where the width changes, then up-sampling
                stage.transition = _conv(widths[i - 1], w) if widths[i - 1] != w else nn.Identity()
            stage.blocks = _blocks(w, card, blocks, expansion, gain)
            self.stages.append(stage)
        self.to_rgb = _conv(widths[-1], channels)

    def forward(self, z: Tensor) -> Tensor:
        z = z.reshape(z.shape[0], self.z_dim)
        h = self.basis.unsqueeze(0) * self.to_basis(z).unsqueeze(-1).unsqueeze(-1)
        for i, stage in enumerate(self.stages):
            if i:
                h = upsample2x(stage.transition(h))
            h = stage.blocks(h)
        x = self.to_rgb(h)
        return x if self.training else x.clamp(-1.0, 1.0)


class R3GANDiscriminator(Critic):
    """images [B, channels, R, R] -> logits [B // pack]; `widths` in G's order (4x4 first)."""

    arch = "r3gan"

    def __init__(self, *, resolution: int, channels: int, widths: list[int], cardinalities: list[int], blocks: int,
                 expansion: int, pack: int) -> None:
        super().__init__(resolution=resolution, channels=channels, pack=pack)
        gain = _block_gain(len(widths), blocks)
        w, cards = widths[::-1], cardinalities[::-1]  # R first, 4x4 last
        self.from_rgb = _conv(channels * pack, w[0])
        self.stages = nn.ModuleList()
        for i, (width, card) in enumerate(zip(w, cards, strict=True)):
            stage = nn.Module()
            stage.blocks = _blocks(width, card, blocks, expansion, gain)
            if i < len(w) - 1:  # down-sampling, then 1x1 conv only where the width changes
                stage.transition = _conv(width, w[i + 1]) if w[i + 1] != width else nn.Identity()
            self.stages.append(stage)
        self.basis = _conv(w[-1], w[-1], 4, groups=w[-1], same=False)  # 4x4 valid depthwise: 4x4 -> 1x1
        self.to_logit = nn.Linear(w[-1], 1, bias=False)
        msr_init(self.to_logit.weight, 1.0)

    def score(self, x: Tensor) -> Tensor:
        h = self.from_rgb(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            h = stage.blocks(h)
            if i < last:
                h = stage.transition(downsample2x(h))
        return self.to_logit(self.basis(h).flatten(1))
