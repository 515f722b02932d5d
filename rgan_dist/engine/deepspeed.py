"""The DeepSpeed strategy: the same loop, G and D each in a DeepSpeed engine.

DeepSpeed. Two engines (G and D), each given the project's torch Adam as a client optimizer, so the
update is the same maths as the other strategies and no DeepSpeed optimizer op has to be JIT-built.
Forwards run through the raw modules (`engine.module`): DeepSpeed 0.19 attaches backward hooks to the
output of `engine(x)` that refuse any backward but `engine.backward`, which the penalty's
`autograd.grad` and the G loss (it backpropagates through D) are not. The G step freezes D
(`requires_grad_(False)`), so D's parameters collect no gradient and none of ZeRO's gradient hooks on D
fire: nothing of the G step reaches D's next update (tests/test_distributed.py checks it). One
`engine.backward` per step (loss + penalty summed), because under ZeRO-1/2 a second backward before
`step()` silently replaces the first. bf16 is autocast over fp32 weights, as in the other strategies
(the EMA and the penalties keep fp32 weights); DeepSpeed's own `bf16`/`fp16` sections are refused.

DeepSpeed checkpoints. Under ZeRO-1/2 each rank holds a slice of the optimizer state, which rank 0
cannot write alone. Every rank calls `engine.save_checkpoint` into `ckpt-<step>.ds/` beside our
`ckpt-<step>.pt` (tags `G` and `D`, no DeepSpeed `latest` file), then rank 0 writes `ckpt-<step>.pt`
(models, EMA, every rank's RNG and data position, config) and only then moves `latest`: a job killed
during either write leaves the previous pair and pointer intact. Keep-K removes both halves together.
`ckpt-<step>.pt` alone holds the full G/D weights, so eval needs no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgan_dist.config import Config
from rgan_dist.deepspeed_config import deepspeed_settings
from rgan_dist.engine.strategy import DistributedStrategy, Phase, step_unless_bad
from rgan_dist.errors import ConfigError, UsageError


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one engine (see `rgan_dist.deepspeed_config.deepspeed_settings`)."""
    return deepspeed_settings(cfg, world_size)


class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def __init__(self, cfg: Config) -> None:
        if cfg.train.precision == "fp16":
            raise ConfigError("train.precision=fp16: not supported with dist.strategy=deepspeed; use bf16 or fp32")
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.ds_config = deepspeed_config(cfg, world)  # before any process group: bad JSON fails fast
        super().__init__(cfg)

    def prepare(self, G: nn.Module, D: nn.Module) -> None:
        import deepspeed

        if self.rank != 0 or not os.environ.get("RGAN_DEEPSPEED_VERBOSE"):
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.device.type == "cpu":
            # DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (60-90 s on first use) that only
            # serves its inference all-reduce, which training never calls; mark it unavailable (this dict
            # is DeepSpeed's documented cache of op compatibility, kept for the process).
            with contextlib.suppress(Exception):
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Picks up our process group (DeepSpeed short-circuits when torch.distributed is initialised).
        deepspeed.init_distributed(dist_backend=self.backend, timeout=timedelta(seconds=self.cfg.dist.timeout_s))
        self._place(G, D)
        optimizers = self._optimizers()
        self.engines: dict[Phase, Any] = {}
        for phase, module in (("g", self.G), ("d", self.D)):
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizers[phase],
                                                   config=copy.deepcopy(self.ds_config), dist_init_required=False)
            self.engines[phase] = engine
        self.opt = {p: e.optimizer for p, e in self.engines.items()}
        self.G, self.D = self.engines["g"].module, self.engines["d"].module
        self._set_forwards(self.G, self.D)

    def _release(self) -> None:
        if hasattr(self, "engines"):
            for engine in self.engines.values():
                with contextlib.suppress(Exception):
                    engine.destroy()
            self.engines.clear()
            self.opt = {}

    def backward_step(self, phase: Phase, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        engine = self.engines[phase]
        engine.backward(loss)
        # all-reduces (ZeRO-0) or reduce-scatters (ZeRO-1/2), steps, zeroes the gradients; the client Adam
        # inside skips a non-finite update on the device (ZeRO-1/2 then copy back the unchanged weights)
        if not step_unless_bad(engine.optimizer, finite, engine.step):
            engine.zero_grad()  # the host-read fallback skipped engine.step, which zeroes the gradients

    def zero_grad(self, phase: Phase) -> None:
        self.engines[phase].zero_grad()

    def state_dict(self) -> dict[str, Any]:
        # Full weights (ZeRO-1/2 keep them replicated): enough for eval. The optimizer state is sharded
        # and lives in the `.ds` folder that `save_sharded` writes.
        return {"strategy": self.name, "G": self.G.state_dict(), "D": self.D.state_dict(),
                "zero_stage": self.ds_config["zero_optimization"]["stage"]}

    def save_sharded(self, directory: Path) -> bool:
        for phase, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=phase.upper(), save_latest=False)
        return True

    def load_state_dict(self, state: dict[str, Any], sharded: Path | None = None) -> None:
        if state.get("strategy") != self.name:
            raise UsageError(f"checkpoint written by dist.strategy={state.get('strategy')!r}: resume it with that "
                             "strategy (a DeepSpeed run keeps its optimizer in DeepSpeed's own format)")
        if sharded is None or not sharded.is_dir():
            raise UsageError(f"checkpoint: DeepSpeed folder {str(sharded)!r} is missing on rank {self.rank}; "
                             "checkpoint.dir must be storage every node can read")
        for phase, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(sharded), tag=phase.upper(), load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise UsageError(f"checkpoint {str(sharded)!r}: DeepSpeed could not load tag {phase.upper()}")
