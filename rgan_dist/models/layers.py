"""Pieces architectures share: the paper's initialisation, spectral norm, PacGAN packing.

They live here, not in each architecture, so that "conv weights N(0, 0.02)" or "D sees `pack`
images stacked on channels" is decided once and reviewed once.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from rgan_dist.errors import ConfigError

__all__ = ["Critic", "apply_spectral_norm", "check_positive_int", "init_weights"]

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
_NORMS = (nn.BatchNorm2d,)


def init_weights(module: nn.Module) -> None:
    """The paper's code's `weights_init` (AlexiaJM/RelativisticGAN `GAN_losses_iter.py`), exactly: conv and
    transposed-conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0, and nothing else. Conv biases
    and Linear layers (cnn32's dense layers) keep PyTorch's default initialisation, as there; dcgan has
    neither, so only cnn32 sees the difference.

    Run it *before* `apply_spectral_norm`: the parametrization then adopts the initialised tensor
    as its `original`, and its power-iteration vectors are drawn afterwards. `Module.apply` visits
    submodules in registration order and every draw comes from the global generator, so one
    `torch.manual_seed` fixes every weight.
    """

    def init_one(m: nn.Module) -> None:
        if isinstance(m, _CONVS):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, _NORMS):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    module.apply(init_one)


def apply_spectral_norm(module: nn.Module) -> None:
    """Spectral-normalise every Conv2d inside `module` (Linear layers are left alone, as in Miyato
    et al.'s CIFAR critic).

    The parametrization API (not the older `torch.nn.utils.spectral_norm` hook) keeps the raw
    weight a plain parameter (`parametrizations.weight.original`) and u/v as buffers, so deepcopy
    (EMA), state_dict round trips, DDP buffer broadcast and double backward for gradient
    penalties all behave like an ordinary module. It clones u/v before use, so two forwards
    before one backward (real and fake batches) are safe.
    """
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        spectral_norm(conv)


def check_positive_int(name: str, value: object) -> int:
    """Reject bools, floats and non-positive values for a size-like argument with one clear line."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}={value!r}: must be a positive integer")
    return value


class Critic(nn.Module):
    """Base of every discriminator: checks the input, does PacGAN packing, returns flat fp32 logits.

    Packing concatenates `pack` consecutive images of the batch along channels
    ([B, C, R, R] -> [B/pack, C*pack, R, R]), so the critic judges a set of images and can notice
    a generator that repeats itself (PacGAN, Lin et al. 2018). Consecutive images are as good a
    grouping as any because batches are shuffled; it also costs no copy at pack=1. Relativistic
    pairing then pairs packed real and fake sets by index, the same as single images.

    Subclasses implement `score(x_packed) -> Tensor` with one logit per packed sample.
    """

    def __init__(self, *, resolution: int, channels: int, pack: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.channels = channels
        self.pack = pack

    def score(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        r, c, p = self.resolution, self.channels, self.pack
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"{type(self).__name__} expects images [B, {c}, {r}, {r}], got {list(x.shape)}")
        b = x.shape[0]
        if b % p:
            raise ValueError(
                f"{type(self).__name__} with pack={p} got a batch of {b} images: "
                f"the batch size must be a multiple of pack (PacGAN judges {p} images at a time)"
            )
        if p > 1:
            # reshape, not view: channels_last inputs are not viewable in this shape.
            x = x.reshape(b // p, p * c, r, r)
        # Flat and fp32: losses index-pair and average logits, which must not run in bf16/fp16.
        return self.score(x).flatten().float()
