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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

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

    # ---- setup ---------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, G: nn.Module, D: nn.Module) -> None:
        """Move the pair to the device, build the optimizers and the forward callables."""
        t = self.cfg.train
        mf = torch.channels_last if t.channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=mf)
        self.D = D.to(self.device, memory_format=mf)
        self.opt: dict[Phase, torch.optim.Optimizer] = {
            "g": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=tuple(t.betas)),
            "d": torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=tuple(t.betas)),
        }
        self.g: Callable[..., torch.Tensor] = self.G
        self.d: Callable[..., torch.Tensor] = self.D
        self.d_frozen: Callable[..., torch.Tensor] = self.D
        if t.compile:
            self.g, self.d, self.d_frozen = torch.compile(self.G), torch.compile(self.D), torch.compile(self.D)

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

    @contextlib.contextmanager
    def frozen_d(self) -> Iterator[None]:
        """D's parameters take no gradient during the G step, so nothing from it leaks into D's update."""
        self.D.requires_grad_(False)
        try:
            yield
        finally:
            self.D.requires_grad_(True)

    # ---- collectives (identity on one process) ---------------------------------------------------

    def all_finite(self, *values: torch.Tensor) -> bool:
        """Whether every rank saw finite values; ranks must agree or a skipped step would desync them."""
        return bool(torch.isfinite(torch.stack([v.detach().float() for v in values])).all())

    def reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v) for k, v in values.items()}

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """Orderly shutdown; distributed strategies destroy their process group here."""

    # ---- checkpoint ----------------------------------------------------------------------------

    @property
    def g_module(self) -> nn.Module:
        return self.G

    @property
    def d_module(self) -> nn.Module:
        return self.D

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.g_module.state_dict(),
            "D": self.d_module.state_dict(),
            "opt_g": self.opt["g"].state_dict(),
            "opt_d": self.opt["d"].state_dict(),
            "scalers": {p: s.state_dict() for p, s in self.scalers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_module.load_state_dict(state["G"])
        self.d_module.load_state_dict(state["D"])
        self.opt["g"].load_state_dict(state["opt_g"])
        self.opt["d"].load_state_dict(state["opt_d"])
        for p, s in state.get("scalers", {}).items():
            if p in self.scalers:
                self.scalers[p].load_state_dict(s)


def make_strategy(cfg: Config) -> Strategy:
    if cfg.dist.strategy == "single":
        return Strategy(cfg)
    from rgan_dist.engine import distributed  # imported lazily: deepspeed is slow to import

    return distributed.make(cfg)
