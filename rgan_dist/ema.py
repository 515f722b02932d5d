"""Exponential moving average of the generator: the copy that samples and FID are taken from."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy of G updated as p_ema <- p_ema + (1 - decay) * (p - p_ema).

    The decay ramps as min(decay, (1 + n) / (10 + n)) so early samples are not dominated by the random
    initialisation (short runs such as the demo would otherwise show mostly noise). Buffers (BatchNorm
    running statistics) are copied, not averaged: they are statistics, not weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
