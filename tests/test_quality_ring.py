"""A quality smoke test that can fail: RaSGAN on a ring of 8 Gaussians must find the modes.

Small MLPs, fixed seed, a few seconds of CPU. The same toy loop runs SGAN for comparison; both
figures are printed (`pytest -s` or the -rA summary shows them) so a regression in a loss is visible
as a number, not only as a red test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rgan_dist import losses

MODES = 8
RADIUS = 2.0
SIGMA = 0.05
CENTRES = torch.tensor([[RADIUS * math.cos(2 * math.pi * k / MODES), RADIUS * math.sin(2 * math.pi * k / MODES)]
                        for k in range(MODES)])


def ring_batch(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, MODES, (n,), generator=g)
    return CENTRES[k] + SIGMA * torch.randn(n, 2, generator=g)


def mlp(i: int, o: int, h: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


def coverage(samples: torch.Tensor) -> tuple[int, float]:
    """(modes holding >= 2% of samples within 3 sigma, fraction of samples within 3 sigma of a mode)."""
    d = torch.cdist(samples, CENTRES)
    dist, nearest = d.min(dim=1)
    good = dist < 3 * SIGMA
    counts = torch.bincount(nearest[good], minlength=MODES)
    return int((counts >= 0.02 * len(samples)).sum()), float(good.float().mean())


def train_toy(loss: str, steps: int = 3000, batch: int = 256, seed: int = 0) -> tuple[int, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: one thread is ~10x faster than two fighting over 2 cores
    try:
        return _train_toy(loss, steps, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _train_toy(loss: str, steps: int, batch: int, seed: int) -> tuple[int, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    G, D = mlp(2, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for _ in range(steps):
        real = ring_batch(batch, g)
        fake = G(torch.randn(batch, 2, generator=g)).detach()
        d = losses.d_loss(loss, D(real).flatten(), D(fake).flatten())
        opt_d.zero_grad()
        d.backward()
        opt_d.step()
        real = ring_batch(batch, g)  # fresh reals for the G step, as the official code
        D.requires_grad_(False)
        c_fake = D(G(torch.randn(batch, 2, generator=g))).flatten()
        gl = losses.g_loss(loss, D(real).flatten(), c_fake)
        opt_g.zero_grad()
        gl.backward()
        opt_g.step()
        D.requires_grad_(True)
    with torch.no_grad():
        return coverage(G(torch.randn(4000, 2, generator=g)))


def test_coverage_metric_can_fail():
    g = torch.Generator().manual_seed(0)
    assert coverage(ring_batch(2000, g))[0] == 8
    collapsed = CENTRES[:1] + SIGMA * torch.randn(2000, 2, generator=g)
    assert coverage(collapsed)[0] == 1
    assert coverage(torch.zeros(2000, 2))[1] == 0.0


@pytest.mark.slow
def test_rasgan_covers_the_ring(capsys):
    ra_modes, ra_frac = train_toy("rasgan")
    s_modes, s_frac = train_toy("sgan")
    with capsys.disabled():
        print(f"\n[ring-8] RaSGAN: {ra_modes}/8 modes, {ra_frac:.1%} within 3 sigma | "
              f"SGAN: {s_modes}/8 modes, {s_frac:.1%} within 3 sigma")
    assert ra_modes >= 7, f"RaSGAN covered only {ra_modes}/8 modes"
    assert ra_frac >= 0.70, f"RaSGAN put only {ra_frac:.1%} of samples within 3 sigma of a mode"
