"""R3GAN's ramps and the EMA half-life (rgan_dist.schedules): values at the start, middle and end of a ramp,
the config's one place for them, and the EMA weight of a half-life in images."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rgan_dist.config import load_config
from rgan_dist.ema import EMA
from rgan_dist.errors import ConfigError
from rgan_dist.schedules import cosine_ramp, ema_beta, hparams_at, images_seen

# R3GAN's CIFAR-10 preset (brownvc/R3GAN train.py), ramp length shortened to 1,000 images
R3GAN_CIFAR = ["train.batch_size=10", "train.lr_g=2e-4", "train.lr_d=2e-4", "train.betas=[0.0, 0.9]",
               "loss.name=rsgan", "loss.penalty=r1+r2", "loss.penalty_weight=0.05", "augment.policy=[flip]",
               "schedule.images=1000", "schedule.lr_end=5e-5", "schedule.beta2_end=0.99", "schedule.gamma_end=0.005",
               "schedule.augment_p_end=0.55", "schedule.ema_half_life=500"]


def test_cosine_ramp_start_middle_end():
    assert cosine_ramp(0, 2e-4, 5e-5, 1000) == 2e-4
    assert cosine_ramp(500, 2e-4, 5e-5, 1000) == pytest.approx((2e-4 + 5e-5) / 2)
    assert cosine_ramp(250, 0.0, 1.0, 1000) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert cosine_ramp(1000, 2e-4, 5e-5, 1000) == 5e-5 and cosine_ramp(10**9, 2e-4, 5e-5, 1000) == 5e-5
    assert cosine_ramp(500, 1.0, 2.0, 0) == 1.0  # no ramp: the start value holds


def test_hparams_follow_r3gan_ramps_over_images_of_all_ranks():
    cfg = load_config(None, R3GAN_CIFAR)
    start, middle, end = hparams_at(cfg, 0, 1), hparams_at(cfg, 50, 1), hparams_at(cfg, 100, 1)
    assert (start.lr_g, start.lr_d, start.beta2, start.gamma, start.augment_p) == (2e-4, 2e-4, 0.9, 0.05, 0.0)
    assert middle.lr_g == pytest.approx(1.25e-4) and middle.beta2 == pytest.approx(0.945)
    assert middle.gamma == pytest.approx(0.0275) and middle.augment_p == pytest.approx(0.275)
    assert (end.lr_d, end.beta2, end.gamma, end.augment_p) == (5e-5, 0.99, 0.005, 0.55)
    # images are counted over all ranks: 25 steps of 2 x 10 images are the middle too, and one such step
    # moves the EMA by a global batch of 20 images
    two = hparams_at(cfg, 25, 2)
    assert dataclasses.replace(two, ema_beta=None) == dataclasses.replace(middle, ema_beta=None)
    assert images_seen(25, 10, 2) == 500 and two.ema_beta == pytest.approx(0.5 ** (20 / 250))
    # the EMA half-life ramps from 0 (beta 0: the EMA follows G) to 500 images
    assert start.ema_beta == 0.0 and end.ema_beta == pytest.approx(0.5 ** (10 / 500))
    assert middle.ema_beta == pytest.approx(0.5 ** (10 / 250))


def test_without_a_schedule_the_config_values_hold():
    cfg = load_config(None, ["train.lr_g=1e-4", "train.lr_d=3e-4", "train.betas=[0.5, 0.9]", "loss.penalty=r1",
                             "loss.penalty_weight=2", "augment.policy=[flip]", "augment.p=0.3"])
    for step in (0, 10**6):
        h = hparams_at(cfg, step, 4)
        assert (h.lr_g, h.lr_d, h.beta2, h.gamma, h.augment_p, h.ema_beta) == (1e-4, 3e-4, 0.9, 2.0, None, None)
    constant = load_config(None, ["schedule.ema_half_life=100", "train.batch_size=4"])  # no ramp length: constant
    assert hparams_at(constant, 0, 1).ema_beta == hparams_at(constant, 999, 1).ema_beta == 0.5 ** (4 / 100)


def test_ema_half_life_halves_the_old_weights_after_half_life_images():
    """With beta = ema_beta(batch, H), after H / batch steps the EMA keeps half of its starting value."""
    g = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(g.weight)
    ema = EMA(g, decay=0.999)
    torch.nn.init.zeros_(g.weight)
    for _ in range(64 // 8):
        ema.update(g, decay=ema_beta(8, 64))
    assert ema.module.weight.item() == pytest.approx(0.5)
    ema.update(g, decay=0.0)  # half-life 0: the EMA copy is G
    assert ema.module.weight.item() == 0.0


def test_schedule_config_is_checked():
    bad = [(["schedule.lr_end=5e-5"], "schedule.images=0"),
           (["schedule.images=10", "schedule.gamma_end=0.1"], "loss.penalty=none"),
           (["schedule.images=10", "schedule.beta2_end=1"], "must be < 1"),
           (["schedule.images=10", "schedule.lr_end=0"], "must be > 0"),
           (["schedule.ema_half_life=100", "train.ema=0"], "train.ema=0"),
           (["schedule.images=10", "schedule.augment_p_end=0.5"], "augment.policy is empty")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    assert load_config(None, ["schedule.images=10", "schedule.lr_end=null"]).schedule.lr_end is None
