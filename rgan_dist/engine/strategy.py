"""The one seam between the GAN loop and how it is distributed.

A strategy owns: the process group and device, how G and D are wrapped, which callable runs each
forward, how a loss is backpropagated and the optimizers stepped, mixed precision, and what goes into
a checkpoint. The loop in `loop.py` is written once against this class; `single` is the plain
one-process strategy; `DistributedStrategy` adds the process group and collectives, and `ddp.py` and
`deepspeed.py` subclass it (`rgan_dist.engine.make_strategy` picks one from the config).

Two raw modules, `G` and `D` (what optimizers, EMA, samples and checkpoints use), and three forward
callables, named after stylegan2-ada's `run_G`/`run_D`:
- `run_G`: the generator used in both phases (wrapped, so G's gradients sync under DDP).
- `run_D`: the discriminator for the D phase (real and fake forwards go through it).
- `run_D_frozen`: the discriminator for the G phase. D's parameters are frozen there, and under DDP and
  DeepSpeed a forward through the wrapper would register gradient hooks that never fire (DDP then
  errors on the next backward; DeepSpeed refuses any backward outside `engine.backward`), so this is
  always the raw module.

`train.compile` compiles the loop's step functions (forward + loss of each phase, their backward through
AOTAutograd), not these callables: `compile_step`.

Collectives (`batch_means`, `all_finite`, `reduce_mean`, `any_rank`, `all_gather_object`, `broadcast_object`,
`barrier`) are identities here; the distributed strategies make every rank agree through them, so the
loop can call them unconditionally. The invariant they rely on: every rank calls the same collectives
in the same order (one `all_finite` per phase, one `any_rank` per logged step, the gathers of a
checkpoint), which holds because the loop has no rank-dependent branch before a collective.

No host synchronisation per step. A training step never reads a device value on the host: `all_finite`
returns a device flag (all-reduced on the device under several ranks), and `backward_step` skips a
non-finite update on the device (`step_unless_bad`). The loop reads its counters only at logged steps.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rgan_dist import losses
from rgan_dist.config import Config
from rgan_dist.engine import distributed
from rgan_dist.engine.faults import FAULT_ENV, parse_faults
from rgan_dist.errors import ConfigError, UsageError

Phase = str  # "g" or "d"


class Strategy:
    """Single process, single device. Subclasses override `prepare`, `backward_step` and the collectives."""

    name = "single"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.process = distributed.locate(cfg.run.device)  # DistributedStrategy then joins the group
        p = self.process
        self.rank, self.world_size, self.local_rank, self.device = p.rank, p.world_size, p.local_rank, p.device
        self.precision = cfg.train.precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if self.precision == "fp16" and self.device.type != "cuda":
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
        self._set_forwards(self.G, self.D)

    def _set_forwards(self, G: Callable[..., torch.Tensor], D: Callable[..., torch.Tensor]) -> None:
        """The forward callables (module docstring): `G`/`D` as the phases call them (wrapped where gradients
        sync), the G phase's D always the raw module."""
        self.run_G, self.run_D, self.run_D_frozen = G, D, self.D

    def compile_step(self, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        """`fn` (a step's forward and loss) under `train.compile`: itself for `none`, else torch.compile'd
        with that mode (`reduce-overhead`: CUDA graphs), falling back to eager with a one-line message
        (once) where capture fails, e.g. no C++ compiler for inductor on CPU."""
        mode = self.cfg.train.compile
        return fn if mode == "none" else _CompiledStep(fn, mode, what, verbose=self.is_main)

    def _place(self, G: nn.Module, D: nn.Module) -> None:
        mf = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=mf)
        self.D = D.to(self.device, memory_format=mf)

    def _optimizers(self) -> dict[Phase, torch.optim.Optimizer]:
        """The same torch Adam for every strategy (DeepSpeed gets it as a client optimizer), so a run's
        numerics do not depend on how it is distributed."""
        t = self.cfg.train
        # fused: one kernel (CUDA) or one vectorised loop (CPU) for all parameters instead of a handful of
        # foreach launches per step (tests/test_reference_step.py pins the update), and it takes GradScaler's
        # `found_inf`, which lets a non-finite step be skipped on the device (`step_unless_bad`).
        return {
            "g": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=tuple(t.betas), fused=True),
            "d": torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=tuple(t.betas), fused=True),
        }

    # ---- per step ------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scale(self, phase: Phase) -> float | torch.Tensor:
        """Current fp16 loss scale (1.0 otherwise): the gradient penalty scales its own autograd.grad.

        Under fp16 a device tensor (`GradScaler.scale` of a one, which also creates the scale before the
        first step), not `get_scale()`'s float: that would read the scale on the host at every D step."""
        scaler = self.scalers.get(phase)
        return scaler.scale(torch.ones((), device=self.device)) if scaler is not None else 1.0

    def backward_step(self, phase: Phase, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        """One backward of the phase's whole loss, then an optimizer step. Exactly one backward per
        step, as DeepSpeed requires (its ZeRO keeps only the last of two backwards before a step).

        `finite` (`all_finite`'s flag): where it is 0 the update is skipped on the device, leaving weights,
        Adam's moments and step count as they were (`step_unless_bad`); None steps unconditionally."""
        opt = self.opt[phase]
        scaler = self.scalers.get(phase)
        if scaler is None:
            loss.backward()
            step_unless_bad(opt, finite, opt.step)
        else:
            if finite is not None:
                # A non-finite loss makes every gradient non-finite (x * 1.0 is exact otherwise), so the
                # scaler's own on-device check skips the step, and backs the scale off as for an overflow.
                loss = loss * torch.where(finite > 0, 1.0, math.nan)
            scaler.scale(loss).backward()
            # Unscaled before the step, not inside fused Adam's kernel: the optimizer's pre-step hooks
            # (GradNorms) must see true gradients. On the device too (found_inf, no host read).
            scaler.unscale_(opt)
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

    def all_finite(self, *values: torch.Tensor) -> torch.Tensor:
        """Whether every rank saw finite values, as a float32 device scalar (1.0 yes, 0.0 no) that the
        host never reads during a step. Ranks must agree or a skipped step would desync them."""
        return torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values])).all().float()

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
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
            raise UsageError(
                f"checkpoint written by dist.strategy={state.get('strategy')!r} keeps its optimizer state in "
                f"DeepSpeed's folder beside it: resume it with dist.strategy={state.get('strategy')}")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        for phase in ("g", "d"):
            opt, saved = self.opt[phase], state[f"opt_{phase}"]
            # How Adam runs (fused, foreach, ...) is this run's choice, not the checkpoint's: a checkpoint
            # written before Adam was fused would otherwise turn it back to the loop that takes no found_inf.
            groups = [{**g, **{k: now[k] for k in _ADAM_IMPLEMENTATION if k in now}}
                      for g, now in zip(saved["param_groups"], opt.param_groups, strict=True)]
            opt.load_state_dict({**saved, "param_groups": groups})
        for p, s in state.get("scalers", {}).items():
            if p in self.scalers:
                self.scalers[p].load_state_dict(s)


class _CompiledStep:
    """torch.compile(fn, mode) that runs `fn` eager from the first call whose compilation fails.

    The failure is reported in one line, once: a run must not die (or flood its log) because one part of a
    step cannot be captured. Random draws stay outside (the loop passes z in), so a failed attempt consumes
    none. With CUDA graphs (`reduce-overhead`) each call starts a new graph step and the caller copies what
    it keeps (`.clone()` of the logged losses), because a replay overwrites the previous outputs."""

    def __init__(self, fn: Callable[..., Any], mode: str, what: str, *, verbose: bool) -> None:
        self.eager, self.what, self.verbose, self.failed = fn, what, verbose, False
        self.cudagraphs = mode == "reduce-overhead"
        self.compiled = torch.compile(fn, mode=mode)

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eager
                self.failed = True
                if self.verbose:
                    why = (str(e).strip().splitlines() or [""])[0][:160]
                    print(f"rgan: warning: train.compile could not compile {self.what} "
                          f"({type(e).__name__}: {why}); it runs eager", flush=True)
        return self.eager(*args)


# Adam's param_group keys that choose an implementation rather than the maths.
_ADAM_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def step_unless_bad(opt: Any, finite: torch.Tensor | None, step: Callable[[], Any]) -> bool:
    """Call `step()` (which steps `opt`, or an engine wrapping it) so that it changes nothing where `finite`
    is 0, without reading `finite` on the host.

    GradScaler's protocol for optimizers with `_step_supports_amp_scaling` (fused Adam): `found_inf` set on
    the optimizer for the duration of the step; the fused kernel then leaves weights and moments untouched
    and takes back its step count increment. (A torch Adam built fused whose groups were loaded from a
    non-fused state dict keeps `_step_supports_amp_scaling` but runs the loop that refuses `found_inf`, hence
    the check of the groups.) An optimizer without it (another optimizer, a device without
    fused Adam) cannot skip on the device, so the host reads the flag: correct, at the cost of a sync.
    Returns False only when that fallback did not call `step()`."""
    inner = opt
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # DeepSpeed's ZeRO wrapper holds the client torch optimizer
    if finite is None:
        step()
    elif getattr(inner, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in inner.param_groups):
        inner.found_inf = 1.0 - finite
        try:
            step()
        finally:
            del inner.found_inf
    elif bool(finite > 0):
        step()
    else:
        return False
    return True


# ---- several ranks ---------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient w.r.t. each rank's input is the sum over ranks of the
    output's gradients, because every rank's loss depends on every rank's input through the sum.

    Our own eight lines rather than `torch.distributed.nn.functional.all_reduce` (the same maths, deprecated
    in torch 2.13) or `_functional_collectives` (private). The backward is a collective too: it runs on
    every rank that backpropagates a loss built from the output, i.e. on all of them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad



class DistributedStrategy(Strategy):
    """The process group (`distributed.Process.join`) and the collectives both distributed strategies share
    (`ddp.DDPStrategy`, `deepspeed.DeepSpeedStrategy`)."""

    name = "distributed"

    def __init__(self, cfg: Config) -> None:
        distributed.ensure_launcher_env()
        super().__init__(cfg)
        self.process.join(cfg.dist.backend, cfg.dist.timeout_s)
        self.backend = self.process.backend
        if self.is_main:
            for warning in distributed.restart_warnings(cfg, os.environ):
                print(f"rgan: warning: {warning}", flush=True)

    # ---- collectives -----------------------------------------------------------------------------

    def _tensor(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def batch_means(self, r: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m(r), m(f) over the global batch (`loss.batch_stats=global`), or this rank's (`local`).

        One all-reduce of (sum r, sum f, count r, count f) whose backward all-reduces the upstream gradient
        (`_AllReduceSum`): every rank's logits get the gradient that flows into the global mean from *all*
        ranks' losses, so after DDP/DeepSpeed average the ranks' gradients they
        equal one process's on the concatenated batch (the reasoning is in `rgan_dist.losses`). Every rank
        calls it the same number of times (the loss name is the same everywhere), as a collective must."""
        if self.cfg.loss.batch_stats == "local":
            return super().batch_means(r, f)
        parts = torch.stack([r.sum(), f.sum(), r.new_tensor(float(r.numel())), f.new_tensor(float(f.numel()))])
        total = _AllReduceSum.apply(parts)
        return total[0] / total[2], total[1] / total[3]

    def all_finite(self, *values: torch.Tensor) -> torch.Tensor:
        # the minimum over ranks, on the device (NCCL: asynchronous to the host)
        ok = super().all_finite(*values).reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok.reshape(())

    def sync_buffers(self, modules: list[nn.Module]) -> None:
        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)

    def reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = list(values)
        # each value to the device first: a CPU scalar beside CUDA ones made torch.stack fail on an H100
        stacked = torch.stack([values[k].detach().float().reshape(()).to(self.device) for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= self.world_size
        return dict(zip(keys, stacked.tolist(), strict=True))

    def any_rank(self, flag: bool) -> bool:
        t = self._tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group this strategy joined (`distributed.Process.close`: barrier, release, destroy)."""
        self.process.close(release=self._release)

    def _release(self) -> None:
        """Drop references to objects that hold the process group (DDP reducers, DeepSpeed engines)."""
