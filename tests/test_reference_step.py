"""`Trainer.train_step` pinned to a reference written here from the formulas of DESIGN.md.

The reference shares nothing with the code under test except the models' initial weights, its own copy
of the data stream and the state of the noise generator: the losses, the penalties (by autograd.grad on
the input), Adam and the EMA ramp are written out below. Each trainer draw (real batch, flip mask, z,
wgan-gp's u) is replayed in the order the loop documents: per D step the real batch (and its flip mask),
z for the fakes, then u; after the D steps the G step's fresh real batch (relativistic losses only) and
z. Both sides run a few outer steps, so a wrong gradient also shows through Adam's moment estimates,
and the batches the trainer took from its data stream are counted and compared with the reference's.

D has no BatchNorm (its statistics would couple the samples, and the penalties are defined per image);
G keeps it, in train mode on both sides. Only the EMA's parameters are compared: how its BatchNorm
buffers are made is a separate concern (recalibration before evaluation).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO, TINY
from torch import Tensor, nn

from rgan_dist.config import Config, load_config
from rgan_dist.data import make_batches
from rgan_dist.engine.loop import Trainer

BASE = [*TINY, "train.batch_size=4", "train.log_every=1", "train.sample_every=0", "tracking.enabled=false",
        "model.d_batch_norm=false", "data.workers=0"]
# Parameters move ~lr = 2e-4 per step and a wrong gradient changes Adam's update by a good part of that;
# the two sides differ only in float summation order (measured: at most 2e-7 over every case here).
ATOL = 1e-6


# ---- the formulas (DESIGN.md, "The formulas"); r = C(x_real), f = C(x_fake) -------------------------

def _bce1(x: Tensor) -> Tensor:
    """Mean BCE(x, 1) = log(1 + e^-x), written as softplus so the reference does not reuse the loss code."""
    return F.softplus(-x).mean()


def _bce0(x: Tensor) -> Tensor:
    return F.softplus(x).mean()


D_LOSS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rasgan": lambda r, f: (_bce1(r - f.mean()) + _bce0(f - r.mean())) / 2,
    "rsgan": lambda r, f: _bce1(r - f),
    "lsgan": lambda r, f: ((r - 1) ** 2).mean() + (f ** 2).mean(),
}
G_LOSS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rasgan": lambda r, f: (_bce1(f - r.mean()) + _bce0(r - f.mean())) / 2,
    "rsgan": lambda r, f: _bce1(f - r),
    "lsgan": lambda r, f: ((f - 1) ** 2).mean(),
}
RELATIVISTIC = {"rasgan", "rsgan"}


def _input_grad(D: nn.Module, x: Tensor) -> Tensor:
    """dC/dx per image, [B, numel/B], with the graph kept so the penalty backpropagates into D."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return g.flatten(1)


def _penalty(name: str, D: nn.Module, real: Tensor, fake: Tensor, weight: float, u: Tensor | None) -> Tensor:
    if name == "none":
        return torch.zeros(())
    if name == "wgan-gp":  # lambda * mean (||grad C(x_hat)|| - 1)^2, x_hat = u xr + (1 - u) xf
        assert u is not None
        x_hat = u.view(-1, 1, 1, 1) * real + (1 - u.view(-1, 1, 1, 1)) * fake
        return weight * ((_input_grad(D, x_hat).norm(dim=1) - 1) ** 2).mean()
    r1 = weight / 2 * _input_grad(D, real).pow(2).sum(1).mean()  # gamma/2 E||grad C(x_real)||^2
    r2 = weight / 2 * _input_grad(D, fake).pow(2).sum(1).mean()
    return {"r1": r1, "r2": r2, "r1+r2": r1 + r2}[name]


class _Adam:
    """Adam (Kingma & Ba, Algorithm 1; torch's eps placement): the update both optimizers must make."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float], eps: float = 1e-8) -> None:
        self.params, self.lr, (self.b1, self.b2), self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: tuple[Tensor, ...]) -> None:
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.sub_(self.lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + self.eps))


class _Recorder:
    """A data stream that keeps a copy of every batch it hands out (to count and identify them)."""

    def __init__(self, it: Any) -> None:
        self.it, self.seen = it, []

    def __iter__(self) -> _Recorder:
        return self

    def __next__(self) -> Tensor:
        batch = next(self.it)
        self.seen.append(batch.clone())
        return batch

    def state(self) -> dict[str, Any]:
        return self.it.state()

    @property
    def skipped(self) -> int:
        return self.it.skipped


def reference_run(cfg: Config, G: nn.Module, D: nn.Module, data: Iterator[Tensor], gen: torch.Generator,
                  steps: int) -> list[Tensor]:
    """`steps` outer steps on G and D (updated in place) from the formulas; returns the EMA parameters."""
    t, loss = cfg.train, cfg.loss
    B, z_dim = t.batch_size, cfg.model.z_dim
    opt_d = _Adam(list(D.parameters()), t.lr_d, tuple(t.betas))
    opt_g = _Adam(list(G.parameters()), t.lr_g, tuple(t.betas))
    ema = [p.detach().clone() for p in G.parameters()]

    def real() -> Tensor:
        x = next(data).float() / 127.5 - 1
        if t.flip:  # mirror each image with probability 1/2 (one uniform draw per image)
            mirror = torch.rand(B, generator=gen) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
        return x

    k = loss.penalty_every
    d_steps = 0
    for n in range(1, steps + 1):
        for _ in range(t.n_dis):  # every D step on its own real batch
            x_real = real()
            with torch.no_grad():
                x_fake = G(torch.randn(B, z_dim, generator=gen))
            # lazy regularisation: the penalty on D steps 0, k, 2k, ... only, with k times the weight
            lazy_on = d_steps % k == 0
            d_steps += 1
            u = torch.rand(B, generator=gen) if loss.penalty == "wgan-gp" and lazy_on else None
            pen = _penalty(loss.penalty, D, x_real, x_fake, k * loss.penalty_weight, u) if lazy_on else 0
            total = D_LOSS[loss.name](D(x_real).flatten(), D(x_fake).flatten()) + pen
            opt_d.step(torch.autograd.grad(total, list(D.parameters())))  # one backward of the sum
        if t.fresh_real_for_g and loss.name in RELATIVISTIC:
            x_real = real()
        c_fake = D(G(torch.randn(B, z_dim, generator=gen))).flatten()
        g_loss = G_LOSS[loss.name](D(x_real).flatten(), c_fake)
        opt_g.step(torch.autograd.grad(g_loss, list(G.parameters())))  # D's parameters get nothing
        decay = min(t.ema, (1 + n) / (10 + n))
        ema = [decay * e + (1 - decay) * p.detach() for e, p in zip(ema, G.parameters(), strict=True)]
    return ema


def check_against_reference(tmp_path, *overrides: str, steps: int = 3) -> tuple[Trainer, list[Tensor]]:
    """Run the Trainer and the reference from the same start; assert same batches, weights and EMA."""
    cfg = load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}", *overrides])
    trainer = Trainer(cfg)
    try:
        G, D = copy.deepcopy(trainer.strategy.G), copy.deepcopy(trainer.strategy.D)
        gen = torch.Generator().set_state(trainer.gen.get_state())
        ref_data = _Recorder(make_batches(cfg, rank=0, world_size=1, device=torch.device("cpu")))
        trainer.data = _Recorder(trainer.data)
        for _ in range(steps):
            trainer.train_step()
        ema = reference_run(cfg, G, D, ref_data, gen, steps)

        assert len(trainer.data.seen) == len(ref_data.seen), "the trainer took a different number of real batches"
        for i, (a, b) in enumerate(zip(trainer.data.seen, ref_data.seen, strict=True)):
            assert torch.equal(a, b), f"real batch {i} differs from the reference's"
        for name, mine, ref in (("G", trainer.strategy.G, G), ("D", trainer.strategy.D, D)):
            for (k, v), r in zip(mine.state_dict().items(), ref.state_dict().values(), strict=True):
                torch.testing.assert_close(v, r, rtol=0, atol=ATOL, msg=f"{name}.{k} differs from the reference")
        assert trainer.ema is not None
        for (k, v), r in zip(trainer.ema.module.named_parameters(), ema, strict=True):
            torch.testing.assert_close(v, r, rtol=0, atol=ATOL, msg=f"EMA {k} differs from the reference")
        return trainer, ref_data.seen
    finally:
        trainer.strategy.close()


# ---- the tests -------------------------------------------------------------------------------------

PENALTIES = ["none", "wgan-gp", "r1", "r2", "r1+r2"]


# lsgan stands for the non-relativistic losses: their G step reads no reals, so no fresh batch is drawn
# for it in the reference; fresh_real_for_g=false keeps the trainer's draws the same whether or not it
# draws a batch it would not use.
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("loss", ["rasgan", "rsgan", "lsgan"])
def test_train_step_equals_the_reference_for_every_penalty(tmp_path, loss, penalty):
    fresh = "true" if loss in RELATIVISTIC else "false"
    check_against_reference(tmp_path, f"loss.name={loss}", f"loss.penalty={penalty}",
                            f"train.fresh_real_for_g={fresh}")


def test_n_dis_draws_a_distinct_real_batch_per_d_step(tmp_path):
    n_dis, steps = 3, 2
    _, batches = check_against_reference(tmp_path, "loss.name=rasgan", "loss.penalty=r1", f"train.n_dis={n_dis}",
                                         steps=steps)
    assert len(batches) == steps * (n_dis + 1)  # n_dis D batches, then the G step's fresh one
    for i in range(len(batches)):
        for j in range(i):
            assert not torch.equal(batches[i], batches[j]), f"batches {j} and {i} are the same"


@pytest.mark.parametrize("fresh", [True, False])
def test_fresh_real_for_g(tmp_path, fresh):
    """rasgan: its G step reads reals, from a batch of its own when train.fresh_real_for_g is set and from
    the last D step's batch otherwise."""
    n_dis, steps = 2, 2
    _, batches = check_against_reference(tmp_path, "loss.name=rasgan", f"train.fresh_real_for_g={fresh}",
                                         f"train.n_dis={n_dis}", steps=steps)
    assert len(batches) == steps * (n_dis + int(fresh))


def test_flips_are_drawn_per_image_from_the_run_generator(tmp_path):
    check_against_reference(tmp_path, "loss.name=rasgan", "loss.penalty=wgan-gp", "train.flip=true", "train.n_dis=2")


def test_ema_follows_the_ramp(tmp_path):
    """decay 0.3 against the ramp (1+n)/(10+n) = 0.18, 0.25, 0.31, 0.36: the ramp wins for two updates,
    the configured decay after that."""
    trainer, _ = check_against_reference(tmp_path, "loss.name=rasgan", "train.ema=0.3", steps=4)
    assert trainer.ema.num_updates == 4


@pytest.mark.parametrize("penalty", ["r1", "wgan-gp", "r1+r2"])
def test_lazy_regularisation_applies_k_times_the_penalty_every_k_th_d_step(tmp_path, penalty):
    """loss.penalty_every=3 over 2 x n_dis=2 = 4 D steps: the penalty, weighted 3x, on D steps 0 and 3 only."""
    trainer, _ = check_against_reference(tmp_path, "loss.name=rasgan", f"loss.penalty={penalty}",
                                         "loss.penalty_every=3", "train.n_dis=2", steps=2)
    assert trainer.d_steps == 4


def test_one_concatenated_d_forward_equals_two(tmp_path):
    """A D without BatchNorm or buffers judges real and fake in one forward (`Trainer.d_concat`); the reference
    runs two. With R1+R2 both input gradients come from that one forward."""
    trainer, _ = check_against_reference(tmp_path, "loss.name=rsgan", "loss.penalty=r1+r2")
    assert trainer.d_concat
