"""What surrounds the loop without being the GAN story: callbacks (how the sweep's trial hooks in), the
stop request a signal makes (a scheduler's SIGTERM, Ctrl-C), what a logged step measures (gradient norms,
throughput, time left) and the progress bar."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from rgan_dist.config import Config
    from rgan_dist.engine.strategy import Strategy


class Trainer(Protocol):
    """What a callback is handed: the run's `engine.loop.Trainer` itself. Named here by the part every
    callback may rely on, so that this module, below the loop, needs no import of it."""

    cfg: Config
    strategy: Strategy
    step: int

    def request_stop(self) -> None: ...

    def save_checkpoint(self) -> Path | None: ...


@dataclass
class TrainResult:
    """What `Trainer.fit` returns (and `on_end` receives)."""

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


class Callback:
    """Hooks a caller adds to a run without subclassing the Trainer (the sweep's trial reports each evaluation
    to Tune, injects its test fault, sets PBT's hyperparameters). Every method is optional: an object with
    any subset of them works, and this class is a no-op base to subclass for convenience.

    - `on_start(trainer)`: fired by `train()` once the Trainer is built (models placed, checkpoint resumed,
      so `trainer.step` is the resumed step), before the first step.
    - `on_step_end(trainer, step, metrics)`: after every outer step, once the step's metrics were logged.
      `metrics` is the logged dict (floats, averaged over ranks) on a logging step (`train.log_every`) and
      `{}` on the others, so a callback never forces a host sync the loop would not make anyway. Fired
      before the step's samples, evaluation and checkpoint.
    - `on_eval(trainer, step, results)`: after each evaluation (`Trainer.evaluate`, in the loop or called
      directly), once its results were logged and best.pt saved.
    - `on_end(trainer, result, error)`: fired by `train()` after `fit()` returned (`error` None) or raised
      (`result` None), while the strategy and tracker are still open (a collective such as
      `trainer.save_checkpoint()` is allowed: every rank is there, also after `TrainingDiverged`, which
      the ranks raise at the same step).

    Stopping. `on_step_end` and `on_eval` may return True, or call `trainer.request_stop()`: the loop
    finishes the current step (samples, evaluation, checkpoint), saves the final checkpoint and returns
    with `TrainResult.stopped` set (not `interrupted`: nothing went wrong). Under several ranks the
    request is agreed in the loop's `any_rank` at the next logged step (none in between: a step reads
    nothing on the host), so a request on any rank stops every rank after the same step. A callback may
    also raise: Tune's `report` ends a stopped trial with `SystemExit(0)`, which `train()` closes as a
    finished run."""

    def on_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> bool | None: ...

    def on_eval(self, trainer: Trainer, step: int, results: dict[str, float]) -> bool | None: ...

    def on_end(self, trainer: Trainer, result: TrainResult | None, error: BaseException | None) -> None: ...


class StopRequest:
    """SIGTERM (a scheduler's pre-emption notice) stops the loop like Ctrl-C: a final checkpoint is saved.

    One process: the handler raises KeyboardInterrupt at once. Several ranks: the handlers (SIGTERM and
    SIGINT) only set a flag that the loop all-reduces at each logged step, so every rank stops after the same
    step and the final checkpoint's collectives line up (an exception in the middle of a collective
    would leave the ranks in different places)."""

    def __init__(self, distributed: bool) -> None:
        self.enabled = distributed
        self.requested = False
        self._previous: dict[int, Any] = {}
        signals = (signal.SIGTERM, signal.SIGINT) if distributed else (signal.SIGTERM,)
        for sig in signals:
            if signal.getsignal(sig) is signal.SIG_IGN:  # started ignoring it (e.g. SIGINT in a background job)
                continue
            # not the main thread (e.g. inside a Ray worker thread): leave signals alone
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.enabled or self.requested:  # a second signal: stop now, without the agreed step
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)


class GradNorms:
    """The L2 norm of each phase's whole gradient, recorded by an optimizer pre-step hook (after DDP's
    all-reduce and fp16 unscaling) as a device tensor, so no host sync, and only when `wanted` (logged steps).

    Only plain torch optimizers are hooked: DeepSpeed ZeRO's see a shard of the gradient, not all of it."""

    def __init__(self, optimizers: dict[str, Any]) -> None:
        self.wanted = False
        self._norms: dict[str, torch.Tensor] = {}
        for phase, opt in optimizers.items():
            if isinstance(opt, torch.optim.Optimizer):
                opt.register_step_pre_hook(functools.partial(self._record, phase))

    def _record(self, phase: str, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.wanted:
            return
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
            self._norms[f"{phase}_grad_norm"] = torch.linalg.vector_norm(norms)

    def take(self) -> dict[str, torch.Tensor]:
        """The norms recorded since the last call (the same keys on every rank: gradients are synchronised)."""
        norms, self._norms = self._norms, {}
        return norms


class Throughput:
    """Images per second between logged steps, counting the real images the steps drew (not a formula), with
    evaluation time taken out (`exclude`), so img/s measures training alone."""

    def __init__(self, images: int) -> None:
        self.start, self.images = time.perf_counter(), images

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def rate(self, images: int) -> float:
        """Images per second since the last call (or construction); restarts the window."""
        now = time.perf_counter()
        rate = (images - self.images) / max(now - self.start, 1e-9)
        self.start, self.images = now, images
        return rate


class Eta:
    """Time left to `total` steps, evaluations included: remaining steps at the measured training rate (wall
    time minus evaluations, so samples and checkpoints count as training) plus the evaluations still due
    (one every `eval_every` steps, as the loop runs them) at their measured mean duration. img/s leaves
    evaluation out on purpose; an ETA that did too would be optimistic whenever FID runs often.

    Before the first evaluation its cost is unknown: `text` then says how many are still due. `clock` is
    injectable so tests need no waiting."""

    def __init__(self, step: int, total: int, eval_every: int, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.first_step, self.total, self.eval_every, self.clock = step, total, eval_every, clock
        self.t0 = clock()
        self.eval_seconds, self.evals = 0.0, 0

    def add_eval(self, seconds: float) -> None:
        self.eval_seconds += seconds
        self.evals += 1

    def evals_left(self) -> int:
        """Evaluations this process still runs: those due after the start step, less those done. Counted, not
        derived from the step: the loop logs a step (and asks for the ETA) before evaluating it."""
        if not self.eval_every:
            return 0
        return self.total // self.eval_every - self.first_step // self.eval_every - self.evals

    def seconds_left(self, step: int) -> float | None:
        """None until a step was timed, or while evaluations are due whose cost was never measured."""
        done = step - self.first_step
        if done <= 0 or (self.evals_left() and not self.evals):
            return None
        per_step = max(self.clock() - self.t0 - self.eval_seconds, 0.0) / done
        mean_eval = self.eval_seconds / self.evals if self.evals else 0.0
        return (self.total - step) * per_step + self.evals_left() * mean_eval

    def text(self, step: int) -> str:
        """For the progress bar: "1h02m", or "4m10s+3 evals" before any evaluation was timed."""
        left = self.seconds_left(step)
        if left is not None:
            return _clock(left)
        done = step - self.first_step
        if done <= 0:
            return "?"
        train = _clock(max(self.clock() - self.t0, 0.0) / done * (self.total - step))
        return f"{train}+{self.evals_left()} evals"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return NoProgress()
    from tqdm import tqdm

    # tqdm's own rate and remaining time are left out: they blend evaluation pauses into a smoothed step rate;
    # the postfix carries img/s (training only) and `Eta`'s estimate (evaluations included).
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
