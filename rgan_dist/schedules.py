"""R3GAN's hyperparameter ramps and the EMA half-life, as pure functions of the number of images seen.

R3GAN (brownvc/R3GAN, `training/training_loop.py`: `cosine_decay_with_warmup`, no warm-up or hold in its
presets) moves lr, Adam's beta2, the R1/R2 weight gamma, the augmentation probability and the EMA half-life
from a start to an end value along half a cosine over `total_nimg` images, then holds the end value:

    value(n) = start + (end - start) * (1 - cos(pi * n / total)) / 2   for n < total, else end.

Its CIFAR-10 preset: total 2e7 images; lr 2e-4 -> 5e-5, beta2 0.9 -> 0.99 (beta1 0), gamma 0.05 -> 0.005,
augmentation p 0 -> 0.55, EMA half-life 0 -> 5e6 images. The EMA weight of one step follows StyleGAN2-ADA:
beta = 0.5 ** (batch / half_life), batch the global batch, so the half-life is counted in images whatever the
batch size (a half-life of 0 gives beta 0: the EMA copy follows G).

Exact resume by construction: every value here depends only on the number of images seen, which is
`step * train.batch_size * world_size` (one generator step consumes one global batch of fakes, as R3GAN counts
`cur_nimg`), and the step is checkpointed. Nothing here has state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rgan_dist.config import Config


def cosine_ramp(nimg: float, start: float, end: float, total: float) -> float:
    """R3GAN's ramp (module docstring): `start` at 0 images, `end` from `total` on; `start` when total <= 0."""
    if total <= 0:
        return start
    if nimg >= total:
        return end
    return start + (end - start) * (1 - math.cos(math.pi * nimg / total)) / 2


def ema_beta(batch: int, half_life: float) -> float:
    """The EMA's weight on its old value after one step of `batch` images, for a half-life in images."""
    return 0.5 ** (batch / max(half_life, 1e-8))


def images_seen(step: int, batch_size: int, world_size: int) -> int:
    """Images seen after `step` generator steps: the count every schedule is a function of."""
    return step * batch_size * world_size


@dataclass(frozen=True)
class Hparams:
    """The values a step uses. `augment_p` is None where p is not scheduled (fixed or adaptive), `ema_beta`
    None where the EMA keeps train.ema's decay (no schedule.ema_half_life)."""

    lr_g: float
    lr_d: float
    beta2: float
    gamma: float
    augment_p: float | None
    ema_beta: float | None


def hparams_at(cfg: Config, step: int, world_size: int) -> Hparams:
    """The hyperparameters for generator step `step` (0-based) of a run with `world_size` ranks: the config's
    values where nothing ramps, each ramp's value at the images seen before this step otherwise."""
    s, t = cfg.schedule, cfg.train
    batch = t.batch_size * world_size
    n = images_seen(step, t.batch_size, world_size)

    def ramp(start: float, end: float | None) -> float:
        return start if end is None else cosine_ramp(n, start, end, s.images)

    p = cfg.augment.p
    scheduled_p = ramp(float(p), s.augment_p_end) if s.augment_p_end is not None else None
    beta = None
    if s.ema_half_life > 0:
        beta = ema_beta(batch, cosine_ramp(n, 0.0, s.ema_half_life, s.images) if s.images else s.ema_half_life)
    return Hparams(lr_g=ramp(t.lr_g, s.lr_end), lr_d=ramp(t.lr_d, s.lr_end), beta2=ramp(t.betas[1], s.beta2_end),
                   gamma=ramp(cfg.loss.penalty_weight, s.gamma_end), augment_p=scheduled_p, ema_beta=beta)
