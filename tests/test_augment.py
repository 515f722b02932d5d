"""Differentiable augmentation (rgan_dist.augment): gradients through every op, p = 0 as the identity, the
same transform for the same global sample on every rank, and ADA's adaptive p."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import free_port

from rgan_dist.augment import AUGMENT_OPS, Augment, apply, cat_params, draw
from rgan_dist.config import load_config
from rgan_dist.errors import ConfigError


def _images(n: int = 4, side: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def _params(policy, n: int, p: float, seed: int = 1):
    return draw(policy, n, p, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", AUGMENT_OPS)
def test_each_op_passes_gradients_to_its_input(op):
    """gradcheck on a tiny double batch with p = 1: the analytic gradient of every op w.r.t. the images
    equals the numerical one (so G learns through the augmentation, and R1/R2 can be taken through it)."""
    x = _images(2, 6, dtype=torch.float64).requires_grad_(True)
    prm = _params([op], 2, p=1.0, seed=3)
    out = apply(x, prm)
    assert not torch.equal(out, x)  # the op did something to these samples
    assert torch.autograd.gradcheck(lambda t: apply(t, prm), (x,), eps=1e-6, atol=1e-5)


def test_every_op_moves_some_sample_and_p_zero_is_the_identity_bit_for_bit():
    x = _images(16, 8)
    for op in AUGMENT_OPS:
        changed = [not torch.equal(a, b) for a, b in zip(apply(x, _params([op], 16, 1.0)), x, strict=True)]
        assert sum(changed) >= 8, op  # some draws can be the identity (a shift of 0, rotation by 0)
    kept = apply(x, _params(AUGMENT_OPS, 16, p=0.0))
    assert torch.equal(kept, x)
    aug = Augment(AUGMENT_OPS, 0.0, seed=1)
    assert aug.sample(16) is None and apply(x, None) is x


def test_p_gates_each_sample_and_skipped_samples_are_untouched():
    x = _images(400, 8)
    prm = _params(["cutout"], 400, p=0.3, seed=5)
    out = apply(x, prm)
    hit = prm["cutout"]
    assert 0.2 < hit.float().mean() < 0.4
    assert torch.equal(out[~hit], x[~hit])
    assert all(not torch.equal(a, b) for a, b in zip(out[hit], x[hit], strict=True))


def test_translation_shifts_by_whole_pixels_and_cutout_zeroes_half_a_side():
    x = _images(64, 16)
    prm = _params(["translation"], 64, 1.0)
    out = apply(x, prm)
    for i in range(64):  # each sample is its input shifted by integers in [-2, 2], zeros where it moved in
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(out[i], _shifted(x[i], dy, dx))]
        assert found, i
    prm = _params(["cutout"], 64, 1.0)
    holes = (apply(torch.ones(64, 3, 16, 16), prm) == 0).all(dim=1).sum(dim=(1, 2))
    assert holes.max() == 64 and holes.min() > 0  # an 8x8 square, clipped at the borders


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
        img[:, max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


def test_the_global_batch_is_drawn_so_ranks_slice_what_one_process_gets():
    """In one process: rank r of 2 (batch B) gets rows r*B.. of the one-process draw of 2B, and the stream
    advances the same on every rank."""
    x = _images(8, 8)
    one = Augment(AUGMENT_OPS, 0.5, seed=7)
    ranks = [Augment(AUGMENT_OPS, 0.5, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        want = apply(x, one.sample(8))
        got = torch.cat([apply(x[4 * r: 4 * r + 4], a.sample(4)) for r, a in enumerate(ranks)])
        assert torch.equal(got, want)
    assert torch.equal(ranks[0].generator.get_state(), ranks[1].generator.get_state())
    # one forward on [real; fake] takes the two draws' parameters concatenated
    pr, pf = one.sample(4), one.sample(4)
    both = apply(torch.cat([x[:4], x[4:]]), cat_params(pr, pf))
    assert torch.equal(both, torch.cat([apply(x[:4], pr), apply(x[4:], pf)]))


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        aug = Augment(AUGMENT_OPS, "adaptive", seed=11, rank=rank, world_size=world, adjust_every=1,
                      speed_images=80)
        aug.p = 0.5
        x = _images(8, 8, seed=3)[4 * rank: 4 * rank + 4]
        outs, ps = [], []

        def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:  # as DistributedStrategy's
            t = torch.stack([v.float() for v in values.values()])
            dist.all_reduce(t)
            return dict(zip(values, (t / world).tolist(), strict=True))

        for step in range(1, 4):
            outs.append(apply(x, aug.sample(4)))
            # alone, rank 0 would raise p and rank 1 lower it; over both ranks r_t = 0 < 0.6: p falls on both
            aug.observe(torch.full((4,), 5.0 if rank == 0 else -5.0))
            aug.adjust(step, reduce_mean)
            ps.append(aug.p)
        torch.save({"out": outs, "p": ps, "gen": aug.generator.get_state()}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_augment_as_one_process_on_the_global_batch(tmp_path):
    torch.multiprocessing.start_processes(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    one = Augment(AUGMENT_OPS, "adaptive", seed=11, adjust_every=1, speed_images=80)
    one.p = 0.5
    x = _images(8, 8, seed=3)
    ps = []
    for step in range(1, 4):
        want = apply(x, one.sample(8))
        assert torch.equal(torch.cat([got[0]["out"][step - 1], got[1]["out"][step - 1]]), want)
        one.observe(torch.tensor([5.0] * 4 + [-5.0] * 4))
        one.adjust(step, _one_process)
        ps.append(one.p)
    assert got[0]["p"] == got[1]["p"] == ps == pytest.approx([0.4, 0.3, 0.2])  # 8 images per window / 80
    assert torch.equal(got[0]["gen"], got[1]["gen"]) and torch.equal(got[0]["gen"], one.generator.get_state())


def _one_process(values: dict[str, torch.Tensor]) -> dict[str, float]:  # Strategy.reduce_mean
    return {k: float(v) for k, v in values.items()}


def _ada_run(real_logit: float, p0: float, steps: int = 20) -> list[float]:
    aug = Augment(["flip"], "adaptive", seed=0, adjust_every=4, speed_images=1000)
    aug.p = p0
    d = torch.nn.Conv2d(3, 1, 8)  # a stub D: a constant output on reals, whatever the weights
    torch.nn.init.zeros_(d.weight)
    torch.nn.init.constant_(d.bias, real_logit)
    ps = []
    for step in range(1, steps + 1):
        real = apply(_images(25, 8, seed=step), aug.sample(25))
        aug.observe(d(real).flatten())
        aug.adjust(step, _one_process)
        ps.append(aug.p)
    return ps


def test_adaptive_p_rises_while_d_overfits_and_falls_when_it_does_not():
    up = _ada_run(5.0, 0.0)  # D certain on every real: r_t = 1 > 0.6
    assert up[2] == 0.0 and up[3] == pytest.approx(0.1) and up[-1] == pytest.approx(0.5)  # 100 images / 1000
    down = _ada_run(-5.0, 0.5)  # r_t = -1 < 0.6
    assert down[3] == pytest.approx(0.4) and down[-1] == pytest.approx(0.0)
    assert _ada_run(-5.0, 0.05)[-1] == 0.0  # clamped at 0


def test_adaptive_p_is_capped_and_its_state_resumes_exactly():
    aug = Augment(AUGMENT_OPS, "adaptive", seed=2, adjust_every=2, speed_images=10, p_max=0.3)
    for step in range(1, 4):
        aug.observe(torch.ones(4))
        aug.adjust(step, _one_process)
    assert aug.p == 0.3  # capped at p_max
    aug.observe(torch.ones(4))  # half a window: each rank's own, saved beside its RNG streams
    twin = Augment(AUGMENT_OPS, "adaptive", seed=99, adjust_every=2, speed_images=10, p_max=0.3)
    twin.load_state_dict(aug.state_dict())
    twin.window.copy_(aug.window)
    x = _images(4)
    assert torch.equal(apply(x, aug.sample(4)), apply(x, twin.sample(4)))
    assert aug.adjust(4, _one_process) == twin.adjust(4, _one_process) == 1.0
    assert aug.p == twin.p


def test_augment_config_is_checked():
    cfg = load_config(None, ["augment.policy=[translation, color, cutout]", "augment.p=adaptive"])
    assert cfg.augment.p == "adaptive" and cfg.augment.policy == ["translation", "color", "cutout"]
    assert load_config(None, ["augment.policy=[flip]", "augment.p=0.25"]).augment.p == 0.25
    bad = [(["augment.p=1.5", "augment.policy=[flip]"], "augment.p=1.5: must be <= 1.0"),
           (["augment.policy=[blur]"], "unknown 'blur'"),
           (["augment.p=0.5"], "augment.policy is empty"),
           (["augment.policy=[flip]", "augment.p=adaptive", "schedule.images=10", "schedule.augment_p_end=0.5"],
            "choose a ramp or ADA")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
