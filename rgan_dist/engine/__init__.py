"""The G/D training engine: `loop` (the GAN story: build, step, fit, evaluate), `step` (one D step and one G
step), `state` (what a checkpoint holds; the collective save and resume), `hooks` (callbacks, signals, what a
logged step measures), the strategy seam (`strategy`: one process; `ddp`, `deepspeed`),
and `distributed` (rank, device, process group: the one entrance, also for `rgan eval` and `rgan fid`).

Imports run one way: distributed <- strategy <- ddp, deepspeed <- this module's `make_strategy` <- loop, and
strategy <- step, hooks, state <- loop (hooks and state are handed the Trainer, typed by a Protocol)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rgan_dist.config import Config
    from rgan_dist.engine.strategy import Strategy


def make_strategy(cfg: Config) -> Strategy:
    """The strategy `dist.strategy` names. DDP and DeepSpeed are imported only when asked for: deepspeed is
    slow to import."""
    if cfg.dist.strategy == "single":
        from rgan_dist.engine.strategy import Strategy

        return Strategy(cfg)
    if cfg.dist.strategy == "ddp":
        from rgan_dist.engine.ddp import DDPStrategy

        return DDPStrategy(cfg)
    if cfg.dist.strategy == "deepspeed":
        from rgan_dist.engine.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg)
    from rgan_dist.errors import ConfigError

    raise ConfigError(f"dist.strategy={cfg.dist.strategy!r}: not a strategy (single, ddp, deepspeed)")
