"""The one seam between the GAN loop and how it is distributed.

A strategy owns: the process group and device, how G and D are wrapped, which callable runs each
forward, how a loss is backpropagated and the optimizers stepped, mixed precision, and what goes into
a checkpoint. The loop in `loop.py` is written once against this class; `single` is the plain
one-process strategy, and `ddp`/`deepspeed` subclass it (`make_strategy` picks one from the config).

Forward callables, and why there are three:
- `g`: the generator used in both phases (wrapped, so G's gradients sync under DDP).
- `d`: the discriminator for the D phase (real, fake and the penalty's forwards all go through it).
- `d_frozen`: the discriminator for the G phase. D's parameters are frozen there, and under DDP and
  DeepSpeed a forward through the wrapper would register gradient hooks that never fire (DDP then
  errors on the next backward; DeepSpeed refuses any backward outside `engine.backward`), so this is
  always the raw module.
- `d_penalty`: `d` without torch.compile, for the gradient penalty's forward: aot_autograd cannot
  double-backward ("torch.compile with aot_autograd does not currently support double backward"), so
  with `train.compile=true` the penalty runs eager while every other forward stays compiled.

Collectives (`batch_means`, `all_finite`, `reduce_mean`, `any_rank`, `all_gather_object`, `broadcast_object`,
`barrier`) are identities here; the distributed strategies make every rank agree through them, so the
loop can call them unconditionally. The invariant they rely on: every rank calls the same collectives
in the same order (one `all_finite` per phase, one `any_rank` per outer step, the gathers of a
checkpoint), which holds because the loop has no rank-dependent branch before a collective.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgan_dist import losses
from rgan_dist.config import Config

Phase = str  # "g" or "d"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from rgan_dist.errors import UsageError

        raise UsageError("run.device=cuda: no CUDA device is visible; use run.device=cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class Strategy:
    """Single process, single device. Subclasses override `prepare`, `backward_step` and the collectives."""

    name = "single"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(cfg.run.device, self.local_rank)
        self.precision = cfg.train.precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if self.precision == "fp16" and self.device.type != "cuda":
            from rgan_dist.errors import ConfigError

            raise ConfigError("train.precision=fp16: needs a CUDA device; use bf16 or fp32 on CPU")
        # fp16 needs loss scaling; one scaler per optimizer because G and D step at different times.
        self.scalers: dict[Phase, torch.amp.GradScaler] = (
            {p: torch.amp.GradScaler(self.device.type) for p in ("g", "d")} if self.precision == "fp16" else {}
        )
        self.faults = parse_faults(os.environ.get(FAULT_ENV, ""))

    # ---- setup ---------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, G: nn.Module, D: nn.Module) -> None:
        """Move the pair to the device, build the optimizers and the forward callables."""
        self._place(G, D)
        self.opt: dict[Phase, torch.optim.Optimizer] = self._optimizers()
        self.g: Callable[..., torch.Tensor] = self.G
        self.d: Callable[..., torch.Tensor] = self.D
        self.d_frozen: Callable[..., torch.Tensor] = self.D
        self.d_penalty: Callable[..., torch.Tensor] = self.D
        if self.cfg.train.compile:
            self.g, self.d, self.d_frozen = torch.compile(self.G), torch.compile(self.D), torch.compile(self.D)

    def _place(self, G: nn.Module, D: nn.Module) -> None:
        mf = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=mf)
        self.D = D.to(self.device, memory_format=mf)

    def _optimizers(self) -> dict[Phase, torch.optim.Optimizer]:
        """The same torch Adam for every strategy (DeepSpeed gets it as a client optimizer), so a run's
        numerics do not depend on how it is distributed."""
        t = self.cfg.train
        return {
            "g": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=tuple(t.betas)),
            "d": torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=tuple(t.betas)),
        }

    # ---- per step ------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scale(self, phase: Phase) -> float:
        """Current fp16 loss scale (1.0 otherwise): the gradient penalty scales its own autograd.grad."""
        return float(self.scalers[phase].get_scale()) if phase in self.scalers else 1.0

    def backward_step(self, phase: Phase, loss: torch.Tensor) -> None:
        """One backward of the phase's whole loss, then an optimizer step. Exactly one backward per
        step, as DeepSpeed requires (its ZeRO keeps only the last of two backwards before a step)."""
        opt = self.opt[phase]
        scaler = self.scalers.get(phase)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    def zero_grad(self, phase: Phase) -> None:
        """Drop the phase's gradients without stepping (a skipped, non-finite step)."""
        self.opt[phase].zero_grad(set_to_none=True)

    def set_hparams(self, phase: Phase, *, lr: float | None = None, betas: tuple[float, float] | None = None) -> None:
        """Set the phase's optimizer learning rate and/or Adam betas from now on (None: keep).

        For PBT: a trial restarted from another trial's checkpoint carries that trial's values in the
        optimizer state, and its own must win. Every strategy steps the same torch Adam (DeepSpeed's
        engines wrap it as a client optimizer, and ZeRO's wrapper exposes the same `param_groups`), so
        setting the groups here is enough everywhere."""
        for group in self.opt[phase].param_groups:
            if lr is not None:
                group["lr"] = lr
            if betas is not None:
                group["betas"] = tuple(betas)

    @contextlib.contextmanager
    def frozen_d(self) -> Iterator[None]:
        """D's parameters take no gradient during the G step, so nothing from it leaks into D's update."""
        self.D.requires_grad_(False)
        try:
            yield
        finally:
            self.D.requires_grad_(True)

    # ---- collectives (identity on one process) ---------------------------------------------------

    def batch_means(self, r: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Ra/Rc reference statistics (m(r), m(f)) the losses compare each sample with (passed as
        `losses.d_loss(..., means=)`). One process: its batch's means; distributed strategies make them
        means over every rank's batch (`loss.batch_stats=global`)."""
        return losses.local_means(r, f)

    def all_finite(self, *values: torch.Tensor) -> bool:
        """Whether every rank saw finite values; ranks must agree or a skipped step would desync them."""
        return bool(torch.isfinite(torch.stack([v.detach().float() for v in values])).all())

    def reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v) for k, v in values.items()}

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on some rank: how ranks agree to stop at the same step."""
        return flag

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, indexed by rank (picklable values only)."""
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def sync_buffers(self, modules: list[nn.Module]) -> None:
        """Make every rank's buffers (BatchNorm running statistics) rank 0's, before they are saved or
        used for evaluation. Training steps never read them (BN normalises with batch statistics)."""

    def close(self) -> None:
        """Orderly shutdown; distributed strategies destroy their process group here."""

    # ---- test hook -------------------------------------------------------------------------------

    def fault_point(self, event: str, step: int) -> None:
        """Fire the fault `RGAN_FAULT_INJECT` asks for at (`event`, `step`) on this rank, if any."""
        for fault in self.faults:
            if fault.event == event and fault.step == step and fault.rank in (None, self.rank) and \
                    fault.restart == int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
                fault.fire(self.rank)

    # ---- checkpoint ----------------------------------------------------------------------------

    @property
    def g_module(self) -> nn.Module:
        return self.G

    @property
    def d_module(self) -> nn.Module:
        return self.D

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "G": self.g_module.state_dict(),
            "D": self.d_module.state_dict(),
            "opt_g": self.opt["g"].state_dict(),
            "opt_d": self.opt["d"].state_dict(),
            "scalers": {p: s.state_dict() for p, s in self.scalers.items()},
        }

    def save_sharded(self, directory: Path) -> bool:
        """Write state that every rank holds a part of (DeepSpeed's ZeRO partitions) into `directory`.

        Called on every rank before rank 0 writes the checkpoint file; returns whether it wrote anything.
        The plain and DDP strategies hold everything on every rank, so rank 0's file is the whole state."""
        return False

    def load_state_dict(self, state: dict[str, Any], sharded: Path | None = None) -> None:
        """Restore `state` (a `state_dict()`); `sharded` is the folder `save_sharded` wrote, if any."""
        if "opt_g" not in state:
            from rgan_dist.errors import UsageError

            raise UsageError(
                f"checkpoint written by dist.strategy={state.get('strategy')!r} keeps its optimizer state in "
                f"DeepSpeed's folder beside it: resume it with dist.strategy={state.get('strategy')}")
        self.g_module.load_state_dict(state["G"])
        self.d_module.load_state_dict(state["D"])
        self.opt["g"].load_state_dict(state["opt_g"])
        self.opt["d"].load_state_dict(state["opt_d"])
        for p, s in state.get("scalers", {}).items():
            if p in self.scalers:
                self.scalers[p].load_state_dict(s)


# ---- fault injection (a test hook) -----------------------------------------------------------------

FAULT_ENV = "RGAN_FAULT_INJECT"


@dataclass(frozen=True)
class Fault:
    """One injected failure: `action` at the end of `step` (event `step`) or while the checkpoint of
    `step` is half written (event `save`), on `rank` (None: every rank), in torchrun attempt `restart`."""

    action: str
    event: str
    step: int
    rank: int | None = None
    restart: int = 0

    def fire(self, rank: int) -> None:
        where = f"{self.event} {self.step} on rank {rank}"
        if self.action == "raise":
            raise RuntimeError(f"{FAULT_ENV}: injected failure at {where}")
        print(f"rgan: {FAULT_ENV}: {self.action} at {where}", flush=True)
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "term":  # a real pre-emption notice: the loop's own SIGTERM handler takes it
            os.kill(os.getpid(), signal.SIGTERM)
        while self.action == "hang":
            time.sleep(3600)


def parse_faults(spec: str) -> list[Fault]:
    """Parse `RGAN_FAULT_INJECT`. A test hook, not a feature: tests use it to make a real rank of a real
    job fail the way production ranks do (an exception, a SIGKILL, a SIGTERM, a hang), with nothing mocked.

    Grammar: comma-separated `ACTION@STEP[:rankR][:restartN]`; ACTION is `raise`, `kill`, `term` (SIGTERM
    to the own process, as a scheduler's pre-emption notice) or `hang` (at the end of outer step STEP) or
    `killsave` (SIGKILL while the checkpoint of STEP is written, after the temp file got its bytes and
    before the rename). Without `:rankR` every rank fires; a fault fires only in
    torchrun attempt N (TORCHELASTIC_RESTART_COUNT, default 0), so a restarted job does not fail again.
    Examples: `raise@3:rank1`, `kill@5:rank0`, `term@5:rank1`, `killsave@4:rank0`."""
    from rgan_dist.errors import UsageError

    faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        head, *mods = item.split(":")
        action, sep, step = head.partition("@")
        rank, restart = None, 0
        try:
            if not sep or action not in ("raise", "kill", "term", "hang", "killsave"):
                raise ValueError
            for m in mods:
                if m.startswith("rank"):
                    rank = int(m[4:])
                elif m.startswith("restart"):
                    restart = int(m[7:])
                else:
                    raise ValueError
            event = "save" if action == "killsave" else "step"
            faults.append(Fault("kill" if action == "killsave" else action, event, int(step), rank, restart))
        except ValueError:
            raise UsageError(f"{FAULT_ENV}={spec!r}: expected ACTION@STEP[:rankR][:restartN] with ACTION one of "
                             "raise, kill, term, hang, killsave (e.g. raise@3:rank1)") from None
    return faults


def make_strategy(cfg: Config) -> Strategy:
    if cfg.dist.strategy == "single":
        return Strategy(cfg)
    from rgan_dist.engine import distributed  # imported lazily: deepspeed is slow to import

    return distributed.make(cfg)
