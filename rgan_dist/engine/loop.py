"""The G/D training loop, written once above the strategy seam (`strategy.py`).

One outer step = `n_dis` discriminator steps, then one generator step, then EMA and bookkeeping.
Every loss decision (which forwards, what is detached, which D is frozen) is in `d_step`/`g_step`
below; the formulas themselves live in `rgan_dist.losses`.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rgan_dist import losses
from rgan_dist.checkpoint import CheckpointManager, load_checkpoint
from rgan_dist.config import Config, dump_config
from rgan_dist.data import BatchIterator, make_batches, to_model_input
from rgan_dist.ema import EMA
from rgan_dist.engine.strategy import Strategy, make_strategy
from rgan_dist.errors import UsageError
from rgan_dist.models import build_models, describe
from rgan_dist.samples import save_grid
from rgan_dist.tracking import JsonlTracker, Tracker


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
    interrupted: bool = False
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Holds the run's state (models via the strategy, EMA, data stream, counters) and steps it."""

    def __init__(self, cfg: Config, strategy: Strategy | None = None, tracker: Tracker | None = None,
                 evaluator: Evaluator | None = None) -> None:
        self.cfg = cfg
        self.s = strategy or make_strategy(cfg)
        seed_everything(cfg.train.seed + self.s.rank)
        m = cfg.model
        G, D = build_models(m.arch, resolution=m.resolution, z_dim=m.z_dim, width=m.width,
                            max_width=m.max_width, channels=m.channels, spectral_norm=m.spectral_norm,
                            g_batch_norm=m.g_batch_norm, d_batch_norm=m.d_batch_norm, pack=m.pack)
        self.model_summary = describe(G, D)
        self.s.prepare(G, D)
        self.ema = EMA(self.s.g_module, cfg.train.ema) if cfg.train.ema > 0 else None
        # Noise, penalty interpolation and flips draw from one per-rank generator on the device, so the
        # whole stream of randomness is a single state to checkpoint (exact resume).
        self.gen = torch.Generator(self.s.device).manual_seed(cfg.train.seed * 7919 + self.s.rank)
        self.fixed_z = torch.randn(cfg.train.sample_grid**2, m.z_dim,
                                   generator=torch.Generator().manual_seed(cfg.train.seed)).to(self.s.device)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
        self.tracker = tracker if tracker is not None else (
            JsonlTracker(cfg.out_dir / "metrics.jsonl") if self.s.is_main else Tracker())
        self.evaluator = evaluator
        self.step = 0
        self.bad_steps_total = 0
        self.bad_in_a_row = {"d": 0, "g": 0}
        self.best_fid = math.inf
        self.samples: list[Path] = []
        data_state = self._maybe_resume()
        self.data: BatchIterator = make_batches(cfg, rank=self.s.rank, world_size=self.s.world_size,
                                                device=self.s.device, state=data_state)

    # ---- one step --------------------------------------------------------------------------------

    def _reals(self) -> torch.Tensor:
        t = self.cfg.train
        return to_model_input(next(self.data), self.s.device, channels_last=t.channels_last,
                              flip=t.flip, generator=self.gen)

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.s.device, generator=self.gen)

    def d_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.s
        with torch.no_grad(), s.autocast():
            fake = s.g(self._z(real.shape[0]))
        with s.autocast():
            c_real, c_fake = s.d(real), s.d(fake)
            loss = losses.d_loss(cfg.loss.name, c_real, c_fake)
        # The penalty is part of the same loss so there is exactly one backward per D step.
        pen = losses.penalty(cfg.loss.penalty, s.d, real, fake, cfg.loss.penalty_weight,
                             generator=self.gen, grad_scale=s.grad_scale("d"))
        total = loss + pen
        stepped = self._guarded_step("d", total)
        return {"d_loss": loss.detach(), "penalty": pen.detach(), "d_real": c_real.detach().float().mean(),
                "d_fake": c_fake.detach().float().mean(), "d_stepped": torch.tensor(float(stepped))}

    def g_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.s
        with s.frozen_d(), s.autocast():
            c_fake = s.d_frozen(s.g(self._z(real.shape[0])))
            # Relativistic losses compare with reals in the G step too; D is frozen, so no grad flows.
            c_real = s.d_frozen(real) if losses.needs_real_in_g_step(cfg.loss.name) else c_fake.detach()
            loss = losses.g_loss(cfg.loss.name, c_real, c_fake)
        stepped = self._guarded_step("g", loss)
        return {"g_loss": loss.detach(), "g_stepped": torch.tensor(float(stepped))}

    def _guarded_step(self, phase: str, loss: torch.Tensor) -> bool:
        """Skip (and count) a step whose loss is not finite on some rank, instead of poisoning weights.

        Consecutive failures are counted per phase: a D that is always NaN between healthy G steps
        is still a diverged run."""
        if self.s.all_finite(loss):
            self.s.backward_step(phase, loss)
            self.bad_in_a_row[phase] = 0
            return True
        self.s.opt[phase].zero_grad(set_to_none=True)
        self.bad_steps_total += 1
        self.bad_in_a_row[phase] += 1
        if self.bad_in_a_row[phase] >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_in_a_row[phase]} consecutive non-finite {phase.upper()} losses at step {self.step}: "
                f"the run diverged; lower train.lr_d/lr_g, add a penalty, or use train.precision=fp32")
        return False

    def train_step(self) -> dict[str, torch.Tensor]:
        real = self._reals()
        for i in range(self.cfg.train.n_dis):
            if i:
                real = self._reals()
            out = self.d_step(real)
        if self.cfg.train.fresh_real_for_g:
            real = self._reals()
        out.update(self.g_step(real))
        if self.ema is not None:
            self.ema.update(self.s.g_module)
        self.step += 1
        return out

    # ---- the run --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, s = self.cfg, self.s
        t = cfg.train
        if s.is_main:
            print(f"rgan: {self.model_summary}; loss {cfg.loss.name} + penalty {cfg.loss.penalty}; "
                  f"strategy {s.name} x{s.world_size} on {s.device}; precision {t.precision}", flush=True)
            print(f"rgan: outputs in {cfg.out_dir}, checkpoints in {cfg.checkpoint_dir}", flush=True)
        progress = _progress(t.steps, self.step, enabled=s.is_main and t.progress)
        interrupted = False
        previous_handler = _install_sigterm_as_interrupt()
        images_per_step = t.batch_size * (t.n_dis + int(t.fresh_real_for_g)) * s.world_size
        window_start, window_steps = time.perf_counter(), 0
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        try:
            while self.step < t.steps:
                out = self.train_step()
                window_steps += 1
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = s.reduce_mean(out)
                    metrics.update(img_per_s=images_per_step * window_steps / max(elapsed, 1e-9),
                                   skipped_samples=float(self.data.skipped),
                                   bad_steps=float(self.bad_steps_total))
                    self.tracker.log_metrics(metrics, self.step)
                    progress.set_postfix(d=f"{metrics['d_loss']:.3f}", g=f"{metrics['g_loss']:.3f}",
                                         img_s=f"{metrics['img_per_s']:.0f}", refresh=False)
                    window_start, window_steps = time.perf_counter(), 0
                progress.update(1)
                if t.sample_every and self.step % t.sample_every == 0:
                    self.save_samples()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True
            if s.is_main:
                print(f"\nrgan: interrupted at step {self.step}; saving a final checkpoint", flush=True)
        finally:
            progress.close()
            _restore_sigterm(previous_handler)
        path = self.save_checkpoint()
        if not interrupted and (not self.samples or not self.samples[-1].stem.endswith(f"{self.step:07d}")):
            self.save_samples()
        return TrainResult(step=self.step, out_dir=cfg.out_dir, checkpoint=path, samples=self.samples,
                           last_metrics=metrics, bad_steps=self.bad_steps_total, interrupted=interrupted,
                           seconds=time.perf_counter() - t0)

    # ---- samples, eval, checkpoints ---------------------------------------------------------------

    @property
    def eval_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.eval.use_ema else self.s.g_module

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        if not self.s.is_main:
            return None
        G = self.ema.module if self.ema is not None else self.s.g_module
        was_training = G.training
        G.eval()
        with self.s.autocast():
            images = G(self.fixed_z)
        G.train(was_training)
        path = save_grid(images, self.cfg.out_dir / "samples" / f"step_{self.step:07d}.png",
                         nrow=self.cfg.train.sample_grid)
        self.samples.append(path)
        self.tracker.log_artifact(path, "samples")
        return path

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        result = self.evaluator(self.step, self.eval_generator)
        self.tracker.log_metrics(result, self.step)
        fid = result.get("fid")
        if fid is not None and fid < self.best_fid:
            self.best_fid = fid
            state = self.state_dict()
            if self.s.is_main:
                self.ckpt.save_best(state)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "rgan-dist/1",
            "step": self.step,
            "config": dump_config(self.cfg),
            "model": self.s.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {"torch": torch.get_rng_state(), "gen": self.gen.get_state(),
                    "cuda": torch.cuda.get_rng_state() if self.s.device.type == "cuda" else None},
            "data": self.data.state(),
            "bad_steps": self.bad_steps_total,
            "best_fid": self.best_fid,
        }

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()
        path = self.ckpt.save(self.step, state) if self.s.is_main else None
        self.s.barrier()
        return path

    def _maybe_resume(self) -> dict[str, Any] | None:
        path = self.ckpt.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return None
        state = load_checkpoint(path)
        if state.get("format") != "rgan-dist/1":
            raise UsageError(f"checkpoint {str(path)!r}: not an rgan-dist training checkpoint")
        self.s.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.bad_steps_total = int(state["bad_steps"])
        self.best_fid = float(state["best_fid"])
        torch.set_rng_state(state["rng"]["torch"])
        self.gen.set_state(state["rng"]["gen"])
        if state["rng"]["cuda"] is not None and self.s.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        if self.s.is_main:
            print(f"rgan: resumed from {path} at step {self.step}", flush=True)
        return state["data"]


def _install_sigterm_as_interrupt() -> Any:
    """SIGTERM (a scheduler's pre-emption notice) stops the loop like Ctrl-C: a final checkpoint is saved."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a Ray worker thread): leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _restore_sigterm(handler: Any) -> None:
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


def train(cfg: Config, **kwargs: Any) -> TrainResult:
    """Build a Trainer for `cfg` and run it to `train.steps`, always closing the strategy."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.tracker.close()
        trainer.s.close()
