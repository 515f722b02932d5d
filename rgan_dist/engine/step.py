"""One D step and one G step: what each phase feeds D and G, the penalty schedule, the guarded update and
the compiled pieces, in one file (after stylegan2-ada's `training/loss.py`, its phases and `run_G`/`run_D`).

`loop.py` composes these into an outer step (`n_dis` D steps, one G step, EMA) and a run. Every loss
decision (which forwards, what is detached, which D is frozen) is here; the formulas themselves live in
`rgan_dist.losses`, and how a forward, a backward or a collective runs under several ranks in the strategy.

Every D forward goes through `run_D` (the D phase's real and fake forwards, the G phase's frozen ones and
the penalty's interpolates), and every G forward through `run_G`: what transforms every image D sees goes
there. The penalty differentiates D's output w.r.t. the tensors handed to `run_D` (`real`/`fake` in
`d_step`), so a transform inside `run_D` leaves R1/R2 taken w.r.t. the untransformed images.

That transform is the differentiable augmentation (`rgan_dist.augment`, `augment.*`): `run_D` applies it to
every image D sees, reals and fakes, in both phases. Its random parameters are drawn before each forward,
outside compiled code (`_aug`), and handed in; with no augmentation (or p = 0) nothing is drawn and `run_D`
is what it was, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from rgan_dist import augment, losses
from rgan_dist.config import Config
from rgan_dist.data import to_model_input
from rgan_dist.engine.strategy import Strategy
from rgan_dist.schedules import hparams_at


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run cannot recover by skipping."""


class GANStep:
    """The two phases of a GAN step on the strategy's models, with the per-rank random stream `gen` (noise,
    flips, penalty interpolation: one state to checkpoint) and the device-side counters of skipped steps."""

    def __init__(self, cfg: Config, strategy: Strategy, gen: torch.Generator) -> None:
        self.cfg, self.strategy, self.gen = cfg, strategy, gen
        dev = strategy.device
        # Non-finite steps, counted on the device so a step never waits for the host (`guarded_update`):
        # all of them, the current run of consecutive ones per phase, and the step at which a phase's run
        # reached train.max_bad_steps (-1: not yet), which `check_diverged` reads at logged steps.
        self.bad_total = torch.zeros((), dtype=torch.int64, device=dev)
        self._bad_run = {p: torch.zeros((), dtype=torch.int64, device=dev) for p in ("d", "g")}
        self._diverged_at = {p: torch.full((), -1, dtype=torch.int64, device=dev) for p in ("d", "g")}
        # D steps so far (lazy regularisation counts them); the Trainer sets it from a resumed step.
        self.d_steps = 0
        self.last_penalty = torch.zeros((), device=dev)  # logged between lazy penalty steps
        self.gamma = cfg.loss.penalty_weight  # the penalty weight; `set_schedules` ramps it under a schedule
        self.augment = augment.from_config(cfg, rank=strategy.rank, world_size=strategy.world_size, device=dev)
        D = strategy.D
        self.d_concat = not any(True for _ in D.buffers()) and not any(
            isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in D.modules())
        # The step's forward+loss functions, compiled once each (`train.compile`), eager where capture fails.
        self.compiled = {name: strategy.compile_step(fn, what) for name, fn, what in (
            ("fakes", self._fakes, "G(z) of the D step"), ("d", self._d_forward, "the D step's forward and loss"),
            ("g", self._g_forward, "the G step's forward and loss"))}

    def set_schedules(self, step: int) -> float | None:
        """Set this step's scheduled hyperparameters (lr, Adam beta2, the penalty's gamma, augmentation p:
        `rgan_dist.schedules`, pure functions of the step, so a resumed run sets what the straight run did);
        returns the step's EMA decay (None: train.ema's). Nothing is touched where nothing is scheduled, so such
        runs step exactly as before."""
        cfg, s = self.cfg, self.strategy
        if not cfg.schedule.images and not cfg.schedule.ema_half_life:
            return None
        h = hparams_at(cfg, step, s.world_size)
        if cfg.schedule.images:
            beta1 = cfg.train.betas[0]
            s.set_hparams("g", lr=h.lr_g, betas=(beta1, h.beta2))
            s.set_hparams("d", lr=h.lr_d, betas=(beta1, h.beta2))
            self.gamma = h.gamma
            if h.augment_p is not None and self.augment is not None:
                self.augment.set_p(h.augment_p)
        return h.ema_beta

    # ---- inputs ------------------------------------------------------------------------------------

    def reals(self, batch: Any) -> torch.Tensor:
        """A batch from the data stream as D's input: on the device, in [-1, 1], flipped per image if asked."""
        t = self.cfg.train
        return to_model_input(batch, self.strategy.device, channels_last=t.channels_last, flip=t.flip,
                              generator=self.gen)

    def z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.strategy.device, generator=self.gen)

    # ---- the forwards ----------------------------------------------------------------------------

    def run_G(self, z: torch.Tensor) -> torch.Tensor:
        return self.strategy.run_G(z)

    def run_D(self, images: torch.Tensor, aug: augment.Params | None = None, *, frozen: bool = False) -> torch.Tensor:
        """D's logits on `images` augmented with `aug` (`_aug`'s draw for them): every D forward of both phases
        passes here. `frozen` in the G phase (`Strategy.run_D_frozen`: the raw module, D's parameters take no
        gradient)."""
        s = self.strategy
        images = augment.apply(images, aug)
        return s.run_D_frozen(images) if frozen else s.run_D(images)

    def _aug(self, n: int) -> augment.Params | None:
        """The augmentation parameters of the next `n` images D sees (None: not augmented)."""
        return self.augment.sample(n) if self.augment is not None else None

    def _fakes(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) for the D step, without a graph (D's update must not reach G)."""
        with torch.no_grad(), self.strategy.autocast():
            return self.run_G(z)

    def _d_forward(self, real: torch.Tensor, fake: torch.Tensor, aug_real: augment.Params | None = None,
                   aug_fake: augment.Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's loss and logits on a real and a fake batch.

        One forward on their concatenation when D treats every image on its own (`d_concat`): half the
        kernel launches, and bigger ones. With BatchNorm the two batches must be normalised with their own
        statistics, and a D with buffers (spectral norm's power iteration, BN's running statistics) would
        update them once instead of twice, so such a D keeps two forwards."""
        s = self.strategy
        with s.autocast():
            if self.d_concat:
                both = augment.cat_params(aug_real, aug_fake) if aug_real is not None else None
                c = self.run_D(torch.cat([real, fake]), both)
                c_real, c_fake = c[: c.shape[0] // 2], c[c.shape[0] // 2:]
            else:
                c_real, c_fake = self.run_D(real, aug_real), self.run_D(fake, aug_fake)
            loss = losses.d_loss(self.cfg.loss.name, c_real, c_fake, means=s.batch_means)
        return loss, c_real, c_fake

    def _g_forward(self, z: torch.Tensor, real: torch.Tensor, aug_fake: augment.Params | None = None,
                   aug_real: augment.Params | None = None) -> torch.Tensor:
        """G's loss (call with D frozen): D on G(z) and, for relativistic losses, on the reals."""
        cfg, s = self.cfg, self.strategy
        with s.autocast():
            c_fake = self.run_D(self.run_G(z), aug_fake, frozen=True)
            # Relativistic losses compare with reals in the G step too; D is frozen, so no grad flows.
            c_real = (self.run_D(real, aug_real, frozen=True) if losses.needs_real_in_g_step(cfg.loss.name)
                      else c_fake.detach())
            return losses.g_loss(cfg.loss.name, c_real, c_fake, means=s.batch_means)

    # ---- the phases --------------------------------------------------------------------------------

    def d_step(self, real: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One D update on `real` and fresh fakes (`step`: the outer step, for the divergence message)."""
        cfg, s = self.cfg, self.strategy
        fake = self.compiled["fakes"](self.z(real.shape[0]))
        augs = (self._aug(real.shape[0]), self._aug(fake.shape[0]))
        # Lazy regularisation (StyleGAN2): the penalty on every k-th D step only, weighted k times, so its
        # expected gradient is unchanged; k = loss.penalty_every, counted over D steps from step 0 (resume too).
        k = cfg.loss.penalty_every
        penalised = cfg.loss.penalty != "none" and self.d_steps % k == 0
        self.d_steps += 1
        sides = losses.penalty_inputs(cfg.loss.penalty) if penalised else None
        if sides is not None:
            # R1/R2 differentiate this very forward at its inputs (no third forward), so it runs eager:
            # aot_autograd cannot double-backward. Under the same autocast as the loss. The inputs are the
            # images handed to `run_D`, before anything it does to them.
            real, fake = real.detach().requires_grad_(sides[0]), fake.detach().requires_grad_(sides[1])
            loss, c_real, c_fake = self._d_forward(real, fake, *augs)
            pen = losses.penalty_from_forward(cfg.loss.penalty, real, fake, c_real, c_fake, self.gamma,
                                              grad_scale=s.grad_scale("d"))
        else:
            loss, c_real, c_fake = self.compiled["d"](real, fake, *augs)
            pen = None
            if penalised:  # wgan-gp: a forward of its own on interpolates (augmented too), eager, outside autocast
                pen = losses.penalty(cfg.loss.penalty, lambda x: self.run_D(x, self._aug(x.shape[0])), real, fake,
                                     self.gamma, generator=self.gen, grad_scale=s.grad_scale("d"))
        if self.augment is not None:  # ADA's statistic (rgan_dist.augment): the relative logit for Ra/Rp losses
            self.augment.observe(c_real - c_fake if losses.needs_real_in_g_step(cfg.loss.name) else c_real)
        if pen is not None:
            self.last_penalty = pen.detach()
        # The penalty is part of the same loss so there is exactly one backward per D step.
        total = loss + pen * k if pen is not None else loss
        stats = {"d_loss": loss.detach().clone(), "penalty": self.last_penalty,
                 "d_real": c_real.detach().float().mean(), "d_fake": c_fake.detach().float().mean()}
        stepped = self.guarded_update("d", total, step)
        return {**stats, "d_stepped": stepped}

    def g_step(self, real: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One G update (D frozen); `real` is read by relativistic losses only."""
        z = self.z(real.shape[0])
        augs = (self._aug(z.shape[0]), self._aug(real.shape[0]) if losses.needs_real_in_g_step(self.cfg.loss.name)
                else None)
        with self.strategy.frozen_d():
            loss = self.compiled["g"](z, real, *augs)
        stepped = self.guarded_update("g", loss, step)
        return {"g_loss": loss.detach().clone(), "g_stepped": stepped}

    # ---- the guarded update ------------------------------------------------------------------------

    def guarded_update(self, phase: str, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Skip (and count) a step whose loss is not finite on some rank, instead of poisoning weights.
        Returns the step's flag (1.0 stepped, 0.0 skipped) as a device tensor.

        Nothing here reads the device: the backward always runs, and the optimizer skips the update on
        the device (`Strategy.backward_step`), so a step never drains the GPU queue. Consecutive failures
        are counted per phase (a D that is always NaN between healthy G steps is still a diverged run);
        `check_diverged` raises at the next logged step."""
        ok = self.strategy.all_finite(loss)
        self.strategy.backward_step(phase, loss, ok)
        bad = ok == 0
        run = self._bad_run[phase]
        run.add_(1).mul_(bad)
        self.bad_total.add_(bad)
        at = self._diverged_at[phase]
        at.masked_fill_((at < 0) & (run >= self.cfg.train.max_bad_steps), step)
        return ok

    def check_diverged(self) -> None:
        """Raise TrainingDiverged if a phase had train.max_bad_steps consecutive non-finite losses: one host
        read, made at logged steps (skipped steps changed no weights meanwhile, so nothing was lost)."""
        d_at, g_at = torch.stack([self._diverged_at["d"], self._diverged_at["g"]]).tolist()
        for phase, at in (("d", d_at), ("g", g_at)):
            if at >= 0:
                raise TrainingDiverged(
                    f"{self.cfg.train.max_bad_steps} consecutive non-finite {phase.upper()} losses at step {at}: "
                    f"the run diverged; lower train.lr_d/lr_g, add a penalty, or use train.precision=fp32")
