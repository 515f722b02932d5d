"""DCGAN pair whose depth follows the image size (the paper's CAT experiments, 64^2 to 256^2).

The rule, as in the official RelativisticGAN code: G starts from a 4x4 map and doubles the side
with each stride-2 transposed conv until it reaches R; D mirrors it, halving from R down to 4x4,
then a 4x4 valid conv gives one logit. That is log2(R) - 2 up/down-sampling convs. Channels
double at every halving in D (width, 2*width, ..., width*R/8) and G uses the same list backwards,
so 64^2 at width 64 gives G 512 -> 256 -> 128 -> 64 -> C, the classic DCGAN.

`max_width` caps every layer: uncapped, 1024^2 at width 64 would need 8192-channel layers
(billions of parameters). At the default cap of 1024 the paper's presets (64^2 and 128^2 at
width 64, 256^2 at width 32) are unchanged.

No conv has a bias (BatchNorm follows, or the paper's code simply omits it). D has no BatchNorm
on its first block, as in DCGAN: normalising raw pixels' first features hurts.
"""

from __future__ import annotations

from torch import Tensor, nn

from rgan_dist.models.layers import Critic, apply_spectral_norm, init_weights

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "dcgan_widths"]


def dcgan_widths(resolution: int, width: int, max_width: int) -> list[int]:
    """D's channel count after each stride-2 conv, from the first (width) to the 4x4 one; capped."""
    n = resolution.bit_length() - 1 - 2  # log2(R) - 2 stride-2 convs between R and 4
    return [min(width * 2**i, max_width) for i in range(n)]


class DCGANGenerator(nn.Module):
    """z [B, z_dim] -> images [B, channels, R, R] in [-1, 1]."""

    arch = "dcgan"

    def __init__(self, *, resolution: int, z_dim: int, width: int, max_width: int, channels: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.resolution, self.z_dim, self.channels = resolution, z_dim, channels
        widths = dcgan_widths(resolution, width, max_width)[::-1]  # widest first, at 4x4

        def up(c_in: int, c_out: int, first: bool) -> nn.Sequential:
            conv = (nn.ConvTranspose2d(c_in, c_out, 4, 1, 0, bias=False) if first  # 1x1 -> 4x4
                    else nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False))
            norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
            return nn.Sequential(conv, *norm, nn.ReLU())

        blocks = [up(z_dim, widths[0], first=True)]
        blocks += [up(a, b, first=False) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Sequential(nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh())
        init_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.to_rgb(self.blocks(z.reshape(z.shape[0], self.z_dim, 1, 1)))


class DCGANDiscriminator(Critic):
    """images [B, channels, R, R] -> logits [B // pack]."""

    arch = "dcgan"

    def __init__(self, *, resolution: int, width: int, max_width: int, channels: int, batch_norm: bool,
                 spectral_norm: bool, pack: int) -> None:
        super().__init__(resolution=resolution, channels=channels, pack=pack)
        widths = dcgan_widths(resolution, width, max_width)

        def down(c_in: int, c_out: int, norm: bool) -> nn.Sequential:
            bn = [nn.BatchNorm2d(c_out)] if norm else []
            return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), *bn, nn.LeakyReLU(0.2))

        blocks = [down(channels * pack, widths[0], norm=False)]
        blocks += [down(a, b, norm=batch_norm) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_logit = nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)  # 4x4 -> 1x1
        init_weights(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def score(self, x: Tensor) -> Tensor:
        return self.to_logit(self.blocks(x))
