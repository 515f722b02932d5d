"""Augmentation and schedules inside the training loop (single process): off and p = 0 change nothing, R1/R2
are taken through the augmentation w.r.t. the un-augmented images, and a run with both resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEMO, TINY

from rgan_dist.augment import apply
from rgan_dist.checkpoint import load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.engine.loop import Trainer, train

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "tracking.enabled=false", "model.d_batch_norm=false",
        "loss.name=rsgan", "loss.penalty=r1+r2", "loss.penalty_weight=0.5"]
ALL_OPS = "augment.policy=[flip, rot90, translation, color, cutout]"
# adaptive p that moves within a few steps, and every ramp over the 6-step run (8 images a step)
ON = [ALL_OPS, "train.betas=[0.0, 0.9]", "augment.p=adaptive", "augment.adjust_every=2", "augment.speed_images=32",
      "augment.target=0.0",
      "schedule.images=48", "schedule.lr_end=5e-5", "schedule.beta2_end=0.99", "schedule.gamma_end=0.05",
      "schedule.ema_half_life=16"]


def cfg_for(tmp_path: Path, *extra: str):
    return load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}/run", *extra])


def _weights(result) -> dict[str, dict[str, torch.Tensor]]:
    state = load_checkpoint(result.checkpoint)
    return {"G": state["model"]["G"], "D": state["model"]["D"], "EMA": state["ema"]["module"]}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(v, b[part][k]) for part in a for k, v in a[part].items())


def test_no_augmentation_and_p_zero_train_bit_for_bit_alike(tmp_path):
    plain = _weights(train(cfg_for(tmp_path / "a", "train.steps=3")))
    p_zero = _weights(train(cfg_for(tmp_path / "b", "train.steps=3", ALL_OPS, "augment.p=0")))
    assert _same(plain, p_zero)
    augmented = _weights(train(cfg_for(tmp_path / "c", "train.steps=3", ALL_OPS, "augment.p=0.5")))
    assert not _same(plain, augmented)  # the comparison can see augmentation


def test_r1_r2_are_taken_through_the_augmentation_at_the_unaugmented_images(tmp_path):
    """R3GAN's penalty with augmentation: gamma/2 E||d D(aug(x)) / dx||^2 on reals and fakes, x before the
    augmentation. Colour and cutout change that norm (a cutout zeroes part of the gradient), so the gradient
    at the augmented images would give another value."""
    t = Trainer(cfg_for(tmp_path, "train.steps=1", "augment.policy=[color, cutout]", "augment.p=1.0"))
    gan, G, D = t.gan, t.strategy.G, t.strategy.D
    real = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    streams = gan.gen.get_state(), t.augment.generator.get_state()
    z = gan.z(8)
    with torch.no_grad():
        fake = G(z)
    aug_real, aug_fake = t.augment.sample(8), t.augment.sample(8)

    def penalty(at_augmented: bool) -> torch.Tensor:
        total = torch.zeros(())
        for x, prm in ((real, aug_real), (fake, aug_fake)):
            x = x.detach().requires_grad_(True)
            seen = apply(x, prm)
            if at_augmented:
                seen = seen.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(D(seen).sum(), seen if at_augmented else x)
            total = total + 0.5 / 2 * grad.square().sum(dim=(1, 2, 3)).mean()
        return total

    want, at_augmented = penalty(False), penalty(True)
    assert not torch.allclose(want, at_augmented, rtol=1e-3)
    gan.gen.set_state(streams[0])
    t.augment.generator.set_state(streams[1])
    got = gan.d_step(real, 0)["penalty"]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-8)
    t.strategy.close()


def test_exact_resume_with_augmentation_and_schedules(tmp_path):
    straight = train(cfg_for(tmp_path / "a", "train.steps=6", "checkpoint.every=3", *ON))
    train(cfg_for(tmp_path / "b", "train.steps=3", *ON))  # stops mid-window (adjust_every=2)
    resumed = train(cfg_for(tmp_path / "b", "train.steps=6", "checkpoint.resume=auto", *ON))
    assert _same(_weights(straight), _weights(resumed))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["augment"]["p"] == b["augment"]["p"] > 0  # p moved, and along the same path
    assert torch.equal(a["augment"]["generator"], b["augment"]["generator"])
    assert torch.equal(a["rng"]["augment_window"], b["rng"]["augment_window"])
    for opt in ("opt_g", "opt_d"):
        group_a, group_b = a["model"][opt]["param_groups"][0], b["model"][opt]["param_groups"][0]
        assert (group_a["lr"], group_a["betas"]) == (group_b["lr"], group_b["betas"])
        assert 5e-5 < group_a["lr"] < 2e-4 and 0.9 < group_a["betas"][1] < 0.99  # ramps on the way


def test_schedules_set_the_optimizers_penalty_weight_and_ema_each_step(tmp_path):
    t = Trainer(cfg_for(tmp_path, "train.steps=6", *ON))
    seen = []
    for _ in range(6):
        t.train_step()
        group = t.strategy.opt["d"].param_groups[0]
        seen.append((group["lr"], group["betas"][1], t.gan.gamma))
    t.strategy.close()
    assert seen[0] == (2e-4, 0.9, 0.5)  # step 0: the start values
    assert seen[3] == pytest.approx(((2e-4 + 5e-5) / 2, (0.9 + 0.99) / 2, (0.5 + 0.05) / 2))  # 24 of 48 images
    assert [lr for lr, _, _ in seen] == sorted((lr for lr, _, _ in seen), reverse=True)


def test_augment_p_is_logged(tmp_path):
    result = train(cfg_for(tmp_path, "train.steps=4", *ON))
    assert "augment_p" in result.last_metrics
    assert "augment_p" not in train(cfg_for(tmp_path / "off", "train.steps=1")).last_metrics

