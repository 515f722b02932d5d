"""The "standard CNN" of Miyato et al. (2018), the paper's CIFAR-10 pair (32x32 only).

G: Linear(z -> 8w*4*4), reshape to 4x4, 3 x [ConvT k4 s2 p1, BN, ReLU] 8w -> 4w -> 2w -> w,
Conv3x3 -> channels, Tanh. No activation after the Linear, as in Miyato's table.
D: conv3x3 w, conv4x4s2 w, conv3x3 2w, conv4x4s2 2w, conv3x3 4w, conv4x4s2 4w, conv3x3 8w, each
followed by LeakyReLU(0.1), then Linear(8w*4*4 -> 1). w = 64 gives the paper's 64..512 channels;
tests use a tiny w.

Every layer has a bias, as in the paper's code, and the same initialisation (`layers.init_weights`):
conv weights N(0, 0.02), while conv biases and both Linear layers keep PyTorch's defaults.
With `batch_norm`, D gets BatchNorm after each of its first six convs (the official code's
non-spectral variant); the paper's "stable" runs use spectral norm on every conv and no BatchNorm
in D, which is `spectral_norm=True, d_batch_norm=False` here: the two switches are independent.
"""

from __future__ import annotations

from torch import Tensor, nn

from rgan_dist.models.layers import Critic, apply_spectral_norm, init_weights

__all__ = ["CNN32Discriminator", "CNN32Generator"]

RESOLUTION = 32


class CNN32Generator(nn.Module):
    """z [B, z_dim] -> images [B, channels, 32, 32] in [-1, 1]."""

    arch = "cnn32"

    def __init__(self, *, z_dim: int, width: int, max_width: int, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.resolution, self.z_dim, self.channels = RESOLUTION, z_dim, channels
        w = [min(width * m, max_width) for m in (8, 4, 2, 1)]
        self._base = w[0]
        self.dense = nn.Linear(z_dim, w[0] * 4 * 4)

        def up(c_in: int, c_out: int) -> nn.Sequential:
            norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
            return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), *norm, nn.ReLU())

        self.blocks = nn.Sequential(*(up(a, b) for a, b in zip(w[:-1], w[1:], strict=True)))
        self.to_rgb = nn.Sequential(nn.Conv2d(w[-1], channels, 3, 1, 1), nn.Tanh())
        init_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        h = self.dense(z.reshape(z.shape[0], self.z_dim)).reshape(z.shape[0], self._base, 4, 4)
        return self.to_rgb(self.blocks(h))


class CNN32Discriminator(Critic):
    """images [B, channels, 32, 32] -> logits [B // pack]."""

    arch = "cnn32"

    def __init__(self, *, width: int, max_width: int, channels: int, batch_norm: bool, spectral_norm: bool,
                 pack: int) -> None:
        super().__init__(resolution=RESOLUTION, channels=channels, pack=pack)
        w1, w2, w4, w8 = (min(width * m, max_width) for m in (1, 2, 4, 8))
        # (c_in, c_out, kernel, stride); padding 1 everywhere keeps 32 -> 16 -> 8 -> 4.
        plan = [(channels * pack, w1, 3, 1), (w1, w1, 4, 2), (w1, w2, 3, 1), (w2, w2, 4, 2),
                (w2, w4, 3, 1), (w4, w4, 4, 2), (w4, w8, 3, 1)]
        layers: list[nn.Module] = []
        for i, (c_in, c_out, k, s) in enumerate(plan):
            layers.append(nn.Conv2d(c_in, c_out, k, s, 1))
            if batch_norm and i < len(plan) - 1:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.1))
        self.features = nn.Sequential(*layers)
        self.to_logit = nn.Linear(w8 * 4 * 4, 1)
        init_weights(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def score(self, x: Tensor) -> Tensor:
        # flatten, not view: under channels_last the feature map is not contiguous in NCHW order.
        return self.to_logit(self.features(x).flatten(1))
