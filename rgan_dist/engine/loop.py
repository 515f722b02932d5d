"""The G/D training loop, written once above the strategy seam (`strategy.py`).

One outer step = `n_dis` discriminator steps, then one generator step, then EMA and bookkeeping.
Every loss decision (which forwards, what is detached, which D is frozen) is in `d_step`/`g_step`
below; the formulas themselves live in `rgan_dist.losses`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rgan_dist import losses
from rgan_dist.checkpoint import CheckpointManager
from rgan_dist.config import Config
from rgan_dist.data import BatchIterator, make_batches, to_model_input
from rgan_dist.ema import EMA
from rgan_dist.engine import make_strategy, state
from rgan_dist.engine.hooks import Callback, Eta, GradNorms, StopRequest, Throughput, progress_bar
from rgan_dist.engine.strategy import Strategy
from rgan_dist.metrics.evaluator import make_evaluator
from rgan_dist.models import build_models, describe
from rgan_dist.samples import save_grid
from rgan_dist.tracking import Tracker, make_tracker, run_tags


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run cannot recover by skipping."""


class Evaluator(Protocol):
    """Called every `eval.every` steps with the generator to judge; returns metrics such as fid/kid."""

    def __call__(self, step: int, generator: torch.nn.Module) -> dict[str, float]: ...


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    checkpoint: Path | None
    samples: list[Path] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    bad_steps: int = 0
    interrupted: bool = False   # Ctrl-C or SIGTERM
    stopped: bool = False       # a callback asked to stop (`Trainer.request_stop`)
    seconds: float = 0.0        # whole fit(), final checkpoint and samples included
    loop_seconds: float = 0.0   # the step loop alone: what throughput figures divide by


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Holds the run's state (models via the strategy, EMA, data stream, counters) and steps it."""

    def __init__(self, cfg: Config, strategy: Strategy | None = None, tracker: Tracker | None = None,
                 evaluator: Evaluator | None = None, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.stop_requested = False
        self.strategy = strategy or make_strategy(cfg)
        # Every rank builds the same models, then seeds its own stream: DeepSpeed broadcasts parameters but
        # not buffers, and spectral norm's u/v drawn from seed + rank differed between ranks for ~30 steps.
        seed_everything(cfg.train.seed)
        m = cfg.model
        G, D = build_models(m)
        seed_everything(cfg.train.seed + self.strategy.rank)
        self.model_summary = describe(G, D)
        self.strategy.prepare(G, D)
        self.ema = EMA(self.strategy.G, cfg.train.ema) if cfg.train.ema > 0 else None
        # Noise, penalty interpolation and flips draw from one per-rank generator on the device, so the
        # whole stream of randomness is a single state to checkpoint (exact resume).
        self.gen = torch.Generator(self.strategy.device).manual_seed(cfg.train.seed * 7919 + self.strategy.rank)
        self.fixed_z = torch.randn(cfg.train.sample_grid**2, m.z_dim,
                                   generator=torch.Generator().manual_seed(cfg.train.seed)).to(self.strategy.device)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
        self.grad_norms = GradNorms(self.strategy.opt)
        self.step = 0
        # Non-finite steps, counted on the device so a step never waits for the host (`_guarded_step`):
        # all of them, the current run of consecutive ones per phase, and the step at which a phase's run
        # reached train.max_bad_steps (-1: not yet), which `_check_diverged` reads at logged steps.
        dev = self.strategy.device
        self._bad_total = torch.zeros((), dtype=torch.int64, device=dev)
        self._bad_run = {p: torch.zeros((), dtype=torch.int64, device=dev) for p in ("d", "g")}
        self._diverged_at = {p: torch.full((), -1, dtype=torch.int64, device=dev) for p in ("d", "g")}
        self.reals_drawn = 0  # real images this rank took from the data stream in this process
        self.best_fid = math.inf
        self.samples: list[Path] = []
        state.claim_run_folder(self, tracker_given=tracker is not None)
        data_state = state.resume(self)
        # D steps so far (lazy regularisation counts them); a run resumes at a whole outer step.
        self.d_steps = self.step * cfg.train.n_dis
        self.last_penalty = torch.zeros((), device=self.strategy.device)  # logged between lazy penalty steps
        D = self.strategy.D
        self.d_concat = not any(True for _ in D.buffers()) and not any(
            isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in D.modules())
        # The step's forward+loss functions, compiled once each (`train.compile`), eager where capture fails.
        self.compiled = {name: self.strategy.compile_step(fn, what) for name, fn, what in (
            ("fakes", self._fakes, "G(z) of the D step"), ("d", self._d_forward, "the D step's forward and loss"),
            ("g", self._g_forward, "the G step's forward and loss"))}
        self.data: BatchIterator = make_batches(cfg, rank=self.strategy.rank, world_size=self.strategy.world_size,
                                                device=self.strategy.device, state=data_state)
        # Last, so a run that fails to start leaves no open MLflow run; the evaluator first, so a missing
        # Inception network fails before a run is created.
        self.evaluator = evaluator if evaluator is not None else make_evaluator(cfg, self.strategy)
        self.tracker = tracker if tracker is not None else make_tracker(cfg, self.strategy.is_main, tags=run_tags(
            cfg, strategy=self.strategy.name, world_size=self.strategy.world_size, device=self.strategy.device,
            extra={"rgan.model": self.model_summary}) if self.strategy.is_main else None)
        if getattr(self.evaluator, "tracker", False) is None:  # an evaluator that logs, not yet told where
            self.evaluator.tracker = self.tracker

    # ---- one step --------------------------------------------------------------------------------

    def _reals(self) -> torch.Tensor:
        t = self.cfg.train
        real = to_model_input(next(self.data), self.strategy.device, channels_last=t.channels_last,
                              flip=t.flip, generator=self.gen)
        self.reals_drawn += real.shape[0]  # what img/s counts: images the steps consumed, nothing assumed
        return real

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.strategy.device, generator=self.gen)

    def _fakes(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) for the D step, without a graph (D's update must not reach G)."""
        s = self.strategy
        with torch.no_grad(), s.autocast():
            return s.run_G(z)

    def _d_forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's loss and logits on a real and a fake batch.

        One forward on their concatenation when D treats every image on its own (`d_concat`): half the
        kernel launches, and bigger ones. With BatchNorm the two batches must be normalised with their own
        statistics, and a D with buffers (spectral norm's power iteration, BN's running statistics) would
        update them once instead of twice, so such a D keeps two forwards."""
        s = self.strategy
        with s.autocast():
            if self.d_concat:
                c = s.run_D(torch.cat([real, fake]))
                c_real, c_fake = c[: c.shape[0] // 2], c[c.shape[0] // 2:]
            else:
                c_real, c_fake = s.run_D(real), s.run_D(fake)
            loss = losses.d_loss(self.cfg.loss.name, c_real, c_fake, means=s.batch_means)
        return loss, c_real, c_fake

    def _g_forward(self, z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """G's loss (call with D frozen): D on G(z) and, for relativistic losses, on the reals."""
        cfg, s = self.cfg, self.strategy
        with s.autocast():
            c_fake = s.run_D_frozen(s.run_G(z))
            # Relativistic losses compare with reals in the G step too; D is frozen, so no grad flows.
            c_real = s.run_D_frozen(real) if losses.needs_real_in_g_step(cfg.loss.name) else c_fake.detach()
            return losses.g_loss(cfg.loss.name, c_real, c_fake, means=s.batch_means)

    def d_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.strategy
        fake = self.compiled["fakes"](self._z(real.shape[0]))
        # Lazy regularisation (StyleGAN2): the penalty on every k-th D step only, weighted k times, so its
        # expected gradient is unchanged; k = loss.penalty_every, counted over D steps from step 0 (resume too).
        k = cfg.loss.penalty_every
        penalised = cfg.loss.penalty != "none" and self.d_steps % k == 0
        self.d_steps += 1
        sides = losses.penalty_inputs(cfg.loss.penalty) if penalised else None
        if sides is not None:
            # R1/R2 differentiate this very forward at its inputs (no third forward), so it runs eager:
            # aot_autograd cannot double-backward. Under the same autocast as the loss.
            real, fake = real.detach().requires_grad_(sides[0]), fake.detach().requires_grad_(sides[1])
            loss, c_real, c_fake = self._d_forward(real, fake)
            pen = losses.penalty_from_forward(cfg.loss.penalty, real, fake, c_real, c_fake, cfg.loss.penalty_weight,
                                              grad_scale=s.grad_scale("d"))
        else:
            loss, c_real, c_fake = self.compiled["d"](real, fake)
            pen = None
            if penalised:  # wgan-gp: a forward of its own on interpolates, eager, outside autocast
                pen = losses.penalty(cfg.loss.penalty, s.run_D, real, fake, cfg.loss.penalty_weight,
                                     generator=self.gen, grad_scale=s.grad_scale("d"))
        if pen is not None:
            self.last_penalty = pen.detach()
        # The penalty is part of the same loss so there is exactly one backward per D step.
        total = loss + pen * k if pen is not None else loss
        stats = {"d_loss": loss.detach().clone(), "penalty": self.last_penalty,
                 "d_real": c_real.detach().float().mean(), "d_fake": c_fake.detach().float().mean()}
        stepped = self._guarded_step("d", total)
        return {**stats, "d_stepped": stepped}

    def g_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.strategy
        z = self._z(real.shape[0])
        with s.frozen_d():
            loss = self.compiled["g"](z, real)
        stepped = self._guarded_step("g", loss)
        return {"g_loss": loss.detach().clone(), "g_stepped": stepped}

    def _guarded_step(self, phase: str, loss: torch.Tensor) -> torch.Tensor:
        """Skip (and count) a step whose loss is not finite on some rank, instead of poisoning weights.
        Returns the step's flag (1.0 stepped, 0.0 skipped) as a device tensor.

        Nothing here reads the device: the backward always runs, and the optimizer skips the update on
        the device (`Strategy.backward_step`), so a step never drains the GPU queue. Consecutive failures
        are counted per phase (a D that is always NaN between healthy G steps is still a diverged run);
        `_check_diverged` raises at the next logged step."""
        ok = self.strategy.all_finite(loss)
        self.strategy.backward_step(phase, loss, ok)
        bad = ok == 0
        run = self._bad_run[phase]
        run.add_(1).mul_(bad)
        self._bad_total.add_(bad)
        at = self._diverged_at[phase]
        at.masked_fill_((at < 0) & (run >= self.cfg.train.max_bad_steps), self.step)
        return ok

    def _check_diverged(self) -> None:
        """Raise TrainingDiverged if a phase had train.max_bad_steps consecutive non-finite losses: one host
        read, made at logged steps (skipped steps changed no weights meanwhile, so nothing was lost)."""
        d_at, g_at = torch.stack([self._diverged_at["d"], self._diverged_at["g"]]).tolist()
        for phase, at in (("d", d_at), ("g", g_at)):
            if at >= 0:
                raise TrainingDiverged(
                    f"{self.cfg.train.max_bad_steps} consecutive non-finite {phase.upper()} losses at step {at}: "
                    f"the run diverged; lower train.lr_d/lr_g, add a penalty, or use train.precision=fp32")

    @property
    def bad_steps_total(self) -> int:
        """Skipped (non-finite) phase steps so far; reads the device counter, so not for every step."""
        return int(self._bad_total)

    @bad_steps_total.setter
    def bad_steps_total(self, value: int) -> None:  # a resumed run's count (engine.state)
        self._bad_total.fill_(value)

    def train_step(self) -> dict[str, torch.Tensor]:
        real = self._reals()
        for i in range(self.cfg.train.n_dis):
            if i:
                real = self._reals()
            out = self.d_step(real)
        # Only relativistic G losses look at reals; for the others a fresh batch would be decoded for nothing.
        if self.cfg.train.fresh_real_for_g and losses.needs_real_in_g_step(self.cfg.loss.name):
            real = self._reals()
        out.update(self.g_step(real))
        if self.ema is not None:
            self.ema.update(self.strategy.G)
        self.step += 1
        return out

    # ---- the run --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, s = self.cfg, self.strategy
        t = cfg.train
        if s.is_main:
            print(f"rgan: {self.model_summary}; loss {cfg.loss.name} + penalty {cfg.loss.penalty}; "
                  f"strategy {s.name} x{s.world_size} on {s.device}; precision {t.precision}", flush=True)
            print(f"rgan: outputs in {cfg.out_dir}, checkpoints in {cfg.checkpoint_dir}", flush=True)
        progress = progress_bar(t.steps, self.step, enabled=s.is_main and t.progress)
        interrupted = False
        stop = StopRequest(distributed=s.world_size > 1)
        throughput = Throughput(self.reals_drawn)
        eta = Eta(self.step, t.steps, cfg.eval.every)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        stopped = False
        try:
            while self.step < t.steps:
                self.grad_norms.wanted = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
                out = self.train_step()
                s.fault_point("step", self.step)
                logged: dict[str, float] = {}
                # Host reads (metrics, the divergence check, the ranks' stop agreement) at logged steps only.
                log_step = self.step % t.log_every == 0 or self.step == t.steps
                if log_step:
                    self._check_diverged()
                    skipped = torch.tensor(float(self.data.skipped))  # this rank's; the metric is the job's sum
                    metrics = s.reduce_mean({**out, **self.grad_norms.take(), "skipped_samples": skipped})
                    metrics["skipped_samples"] = float(round(metrics["skipped_samples"] * s.world_size))
                    metrics.update(img_per_s=throughput.rate(self.reals_drawn) * s.world_size,  # same on every rank
                                   bad_steps=float(self.bad_steps_total))
                    self.tracker.log_metrics(metrics, self.step)
                    progress.set_postfix(d=f"{metrics['d_loss']:.3f}", g=f"{metrics['g_loss']:.3f}",
                                         img_s=f"{metrics['img_per_s']:.0f}", eta=eta.text(self.step), refresh=False)
                    logged = metrics
                self._fire_stoppable("on_step_end", self.step, logged)
                progress.update(1)
                if t.sample_every and self.step % t.sample_every == 0:
                    self.save_samples()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    eval_start = time.perf_counter()
                    self.evaluate()
                    eval_seconds = time.perf_counter() - eval_start
                    throughput.exclude(eval_seconds)  # img/s measures training, not eval
                    eta.add_eval(eval_seconds)  # the ETA does count it
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                # Ranks agree to stop at the same step (one tiny all-reduce, at logged steps), so the final
                # checkpoint's gathers line up even when the signal (or a callback's request) reached them at
                # different moments. One process: a signal raised at once; a callback's request stops here.
                wants = stop.requested or self.stop_requested
                agreed = (log_step and s.any_rank(wants)) if stop.enabled else wants
                if agreed and self.step < t.steps:
                    if not self.stop_requested:
                        raise KeyboardInterrupt
                    stopped = True
                    if s.is_main:
                        print(f"rgan: stopped at step {self.step} at a callback's request", flush=True)
                    break
        except KeyboardInterrupt:
            interrupted = True
            if s.is_main:
                print(f"\nrgan: interrupted at step {self.step}; saving a final checkpoint", flush=True)
        finally:
            loop_seconds = time.perf_counter() - t0
            progress.close()
            stop.restore()
        path = self.save_checkpoint()
        if not interrupted and (not self.samples or not self.samples[-1].stem.endswith(f"{self.step:07d}")):
            self.save_samples()
        return TrainResult(step=self.step, out_dir=cfg.out_dir, checkpoint=path, samples=self.samples,
                           last_metrics=metrics, bad_steps=self.bad_steps_total, interrupted=interrupted,
                           stopped=stopped, seconds=time.perf_counter() - t0, loop_seconds=loop_seconds)

    # ---- samples, eval, checkpoints ---------------------------------------------------------------

    @property
    def eval_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.eval.use_ema else self.strategy.G

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        if not self.strategy.is_main:
            return None
        # the EMA copy's BatchNorm statistics are recomputed for its own weights first (rgan_dist.ema)
        G = self.ema.recalibrated(self.cfg) if self.ema is not None else self.strategy.G
        was_training = G.training
        G.eval()
        with self.strategy.autocast():
            images = G(self.fixed_z)
        G.train(was_training)
        path = save_grid(images, self.cfg.out_dir / "samples" / f"step_{self.step:07d}.png",
                         nrow=self.cfg.train.sample_grid)
        self.samples.append(path)
        self.tracker.log_image(path, "samples", self.step)  # MLflow's image slider, one grid per step
        return path

    def evaluate(self) -> dict[str, float]:
        result = self._evaluate() if self.evaluator is not None else {}
        self._fire_stoppable("on_eval", self.step, result)
        return result

    def _evaluate(self) -> dict[str, float]:
        G = self.eval_generator
        if self.ema is not None and G is self.ema.module:
            self.ema.recalibrated(self.cfg)  # same seed on every rank; then rank 0's buffers win anyway
        self.strategy.sync_buffers(self.buffered_modules())
        result = self.evaluator(self.step, G)
        if result:  # with the protocol the value was computed under, when the evaluator says it
            self.tracker.log_metrics(result, self.step, context=getattr(self.evaluator, "protocol", None))
        fid = result.get("fid")
        if fid is not None and fid < self.best_fid:
            self.best_fid = fid
            best = self.state_dict()
            if self.strategy.is_main:
                self.ckpt.save_best(best)
        return result

    # ---- callbacks --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """End the run after the current step, with a final checkpoint (see `Callback`)."""
        self.stop_requested = True

    def fire(self, hook: str, *args: Any) -> list[Any]:
        """Call `hook(self, *args)` on every callback that has it, in order; their return values."""
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks if hasattr(cb, hook)]

    def _fire_stoppable(self, hook: str, *args: Any) -> None:
        if any(r is True for r in self.fire(hook, *args)):
            self.request_stop()

    def buffered_modules(self) -> list[torch.nn.Module]:
        mods = [self.strategy.G, self.strategy.D]
        return mods + [self.ema.module] if self.ema is not None else mods

    def state_dict(self) -> dict[str, Any]:
        return state.state_dict(self)

    def save_checkpoint(self) -> Path | None:
        """Collective: every rank calls it at the same step (`rgan_dist.engine.state.save_checkpoint`)."""
        return state.save_checkpoint(self)


def train(cfg: Config, strategy: Strategy | None = None, *, callbacks: Sequence[Callback] = (),
          **kwargs: Any) -> TrainResult:
    """The one lifecycle of a run, for `rgan train`, the sweep's trials and tests: build a Trainer for `cfg`,
    fire `on_start`, run it to `train.steps`, fire `on_end`, log the final and best checkpoints, then close
    the tracker and the strategy (with it the process group), given or not, also when building fails.

    The tracker's status: FINISHED, KILLED (Ctrl-C/SIGTERM), or FAILED; a `SystemExit(0)` raised inside
    the run (Tune's `report` ending a stopped trial) is the host ending it on purpose: FINISHED."""
    s = strategy or make_strategy(cfg)
    trainer: Trainer | None = None
    status = "FAILED"
    try:
        trainer = Trainer(cfg, strategy=s, callbacks=callbacks, **kwargs)
        trainer.fire("on_start")
        try:
            result = trainer.fit()
        except BaseException as e:
            trainer.fire("on_end", None, e)
            raise
        trainer.fire("on_end", result, None)
        status = "KILLED" if result.interrupted else "FINISHED"
        if result.checkpoint is not None:
            trainer.tracker.log_checkpoint(result.checkpoint, "final")
        trainer.tracker.log_checkpoint(trainer.ckpt.dir / "best.pt", "best")
        if s.is_main and cfg.tracking.enabled:  # the final G as an MLflow model (rgan_dist.mlflow_model)
            from rgan_dist.mlflow_model import log_final_generator

            log_final_generator(trainer.tracker, result.checkpoint, trainer.cfg.out_dir)
        return result
    except SystemExit as e:
        if e.code in (0, None):
            status = "FINISHED"
        raise
    finally:
        if trainer is not None:
            trainer.tracker.close(status)
        s.close()
