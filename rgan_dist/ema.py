"""Exponential moving average of the generator: the copy that samples and FID are taken from.

BatchNorm statistics are not weights and cannot be averaged: the running mean/var that the live G
collected describe the live G's activations, not those of the averaged weights (measured on the demo:
the EMA G's copied running_var was 1.14x the variance of its own activations). So the EMA copy's
statistics are recomputed for its own weights (`recalibrate_batch_norm`) before anything looks at it
in eval mode: every evaluation, every sample grid, and `rgan eval` of a checkpoint.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from rgan_dist.config import Config

BN_SEED_OFFSET = 0xB4  # the recalibration latents: train.seed + this, never the training noise stream
BN_RECALIBRATION_SAMPLES = 1024  # about: whole batches of eval.batch_size, at least BN_MIN_BATCHES of them
BN_MIN_BATCHES = 4


class EMA:
    """Shadow copy of G updated as p_ema <- p_ema + (1 - decay) * (p - p_ema).

    The decay ramps as min(decay, (1 + n) / (10 + n)) so early samples are not dominated by the random
    initialisation (short runs such as the demo would otherwise show mostly noise). Buffers (BatchNorm
    running statistics) are copied, not averaged; they are placeholders until `recalibrated` recomputes
    them for the EMA weights (module docstring).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One step of the average. `decay` (the weight kept on the old value) overrides the ramped
        train.ema for this step: what a half-life in images gives (`rgan_dist.schedules.ema_beta`)."""
        self.num_updates += 1
        if decay is None:
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def recalibrated(self, cfg: Config) -> nn.Module:
        """The EMA generator with BatchNorm statistics of its own weights (`recalibrate_for`)."""
        recalibrate_for(self.module, cfg)
        return self.module

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(generator: nn.Module, z_dim: int, *, batch_size: int, seed: int,
                           num_samples: int = BN_RECALIBRATION_SAMPLES) -> int:
    """Recompute `generator`'s BatchNorm running statistics for its current weights, in place.

    Resets them, forwards whole batches of z ~ N(0, I) (drawn from `seed` only) in train mode with
    cumulative averaging (momentum None: every batch weighs the same), then restores the momentum and
    the mode. The result depends only on the weights, `seed` and `batch_size`, so every rank computes
    identical buffers and `rgan eval` of a checkpoint reproduces what the run evaluated. Returns the
    number of batches forwarded (0 when G has no BatchNorm)."""
    norms = batch_norms(generator)
    if not norms:
        return 0
    device = next(generator.parameters()).device
    batch = max(2, batch_size)  # train-mode BatchNorm needs more than one value per channel
    batches = max(BN_MIN_BATCHES, math.ceil(num_samples / batch))
    momenta = [m.momentum for m in norms]
    was_training = generator.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator(device=device).manual_seed(int(seed))
    generator.train()
    try:
        for _ in range(batches):
            generator(torch.randn(batch, z_dim, generator=gen, device=device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        generator.train(was_training)
    return batches


def recalibrate_for(generator: nn.Module, cfg: Config) -> int:
    """`recalibrate_batch_norm` with a run's settings: the one call the loop (evaluation, sample grids)
    and `rgan eval`/`rgan generate` make, so all of them see the same statistics for the same weights."""
    return recalibrate_batch_norm(generator, cfg.model.z_dim, batch_size=cfg.eval.batch_size,
                                  seed=cfg.train.seed + BN_SEED_OFFSET)
