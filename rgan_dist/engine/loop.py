"""The G/D training loop, written once above the strategy seam (`strategy.py`): build, step, fit, evaluate.

One outer step = `n_dis` discriminator steps, then one generator step, then EMA and bookkeeping. What
one D step and one G step do (inputs, forwards, penalty schedule, guarded update) is `engine.step`;
checkpoint state is `engine.state`; callbacks, the stop request and what a logged step measures are
`engine.hooks`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgan_dist import losses
from rgan_dist.augment import Augment
from rgan_dist.checkpoint import CheckpointManager
from rgan_dist.config import Config
from rgan_dist.data import BatchIterator, make_batches
from rgan_dist.ema import EMA
from rgan_dist.engine import make_strategy, state
from rgan_dist.engine.hooks import Callback, Eta, GradNorms, StopRequest, Throughput, TrainResult, progress_bar
from rgan_dist.engine.step import GANStep, TrainingDiverged
from rgan_dist.engine.strategy import Strategy
from rgan_dist.metrics.evaluator import Evaluator, make_evaluator
from rgan_dist.models import build_models, describe
from rgan_dist.run_info import run_tags
from rgan_dist.samples import save_grid
from rgan_dist.tracking import Tracker, make_tracker

__all__ = ["Evaluator", "Trainer", "TrainResult", "TrainingDiverged", "seed_everything", "train"]


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
        self.gan = GANStep(cfg, self.strategy, self.gen)  # one D step and one G step (engine.step)
        self.d_concat = self.gan.d_concat  # real and fake judged in one D forward (`GANStep._d_forward`)
        self.reals_drawn = 0  # real images this rank took from the data stream in this process
        self.best_fid = math.inf
        self.samples: list[Path] = []
        state.claim_run_folder(self, tracker_given=tracker is not None)
        data_state = state.resume(self)
        self.gan.d_steps = self.step * cfg.train.n_dis  # a run resumes at a whole outer step
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
        real = self.gan.reals(next(self.data))
        self.reals_drawn += real.shape[0]  # what img/s counts: images the steps consumed, nothing assumed
        return real

    def train_step(self) -> dict[str, torch.Tensor]:
        ema_decay = self.gan.set_schedules(self.step)
        real = self._reals()
        for i in range(self.cfg.train.n_dis):
            if i:
                real = self._reals()
            out = self.gan.d_step(real, self.step)
        # Only relativistic G losses look at reals; for the others a fresh batch would be decoded for nothing.
        if self.cfg.train.fresh_real_for_g and losses.needs_real_in_g_step(self.cfg.loss.name):
            real = self._reals()
        out.update(self.gan.g_step(real, self.step))
        if self.ema is not None:
            self.ema.update(self.strategy.G, decay=ema_decay)
        self.step += 1
        if self.augment is not None:  # ADA: at the end of each window, p from every rank's statistic
            self.augment.adjust(self.step, self.strategy.reduce_mean)
        return out

    @property
    def augment(self) -> Augment | None:
        return self.gan.augment

    @property
    def d_steps(self) -> int:
        return self.gan.d_steps

    @d_steps.setter
    def d_steps(self, value: int) -> None:
        self.gan.d_steps = value

    @property
    def bad_steps_total(self) -> int:
        """Skipped (non-finite) phase steps so far; reads the device counter, so not for every step."""
        return int(self.gan.bad_total)

    @bad_steps_total.setter
    def bad_steps_total(self, value: int) -> None:  # a resumed run's count (engine.state)
        self.gan.bad_total.fill_(value)

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
        if self.step == 0 and t.sample_every and self.tracker.slider_starts_at_zero:
            self.save_samples()  # the untrained G's grid: where MLflow's image slider opens
        try:
            while self.step < t.steps:
                self.grad_norms.wanted = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
                out = self.train_step()
                s.fault_point("step", self.step)
                logged: dict[str, float] = {}
                # Host reads (metrics, the divergence check, the ranks' stop agreement) at logged steps only.
                log_step = self.step % t.log_every == 0 or self.step == t.steps
                if log_step:
                    self.gan.check_diverged()
                    skipped = torch.tensor(float(self.data.skipped))  # this rank's; the metric is the job's sum
                    metrics = s.reduce_mean({**out, **self.grad_norms.take(), "skipped_samples": skipped})
                    metrics["skipped_samples"] = float(round(metrics["skipped_samples"] * s.world_size))
                    metrics.update(img_per_s=throughput.rate(self.reals_drawn) * s.world_size,  # same on every rank
                                   bad_steps=float(self.bad_steps_total))
                    if self.augment is not None:
                        metrics["augment_p"] = self.augment.p  # the same on every rank (rgan_dist.augment)
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
        except BaseException:
            stop.restore()  # an error leaves the loop: no final save follows, so the handlers go now
            raise
        finally:
            loop_seconds = time.perf_counter() - t0
            progress.close()
        # The stop handlers stay in place through the final save: a rank whose own signal comes after the agreed
        # stop (parent_watch polls each rank's launcher on its own clock) must absorb it as its first, not die of
        # the default SIGTERM in the middle of the save's collectives, which cost every rank the checkpoint
        try:
            path = self.save_checkpoint()
        finally:
            stop.restore()
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

            log_final_generator(trainer.tracker, result.checkpoint, trainer.cfg.out_dir, result.step)
        return result
    except SystemExit as e:
        if e.code in (0, None):
            status = "FINISHED"
        raise
    finally:
        if trainer is not None:
            trainer.tracker.close(status)
        s.close()
