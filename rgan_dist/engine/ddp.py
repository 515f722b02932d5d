"""The DDP strategy: the same loop, G and D each wrapped in DistributedDataParallel.

DDP. G and D are each wrapped; the optimizers, `G`/`D` and checkpoints use the raw modules,
so a DDP checkpoint has the plain keys (no `module.` prefix) and loads in a single process. The D phase
runs every forward through the wrapper (real, fake, and the penalty's forward on interpolates, whose
`autograd.grad(create_graph=True)` w.r.t. the *inputs* never touches DDP's parameter hooks); the one
`backward()` of loss + penalty then all-reduces D's gradients, penalty's double-backward part included.
The G phase runs G through its wrapper and D as the frozen raw module (`run_D_frozen`), so only G's
gradients are reduced and D gets none.

BatchNorm, the choice and why. In training mode BatchNorm normalises with the batch's own statistics,
so running statistics never change a training step; they matter only for eval and checkpoints. The
default (`dist.broadcast_buffers=false`) keeps them rank-local during training and broadcasts rank 0's
to every rank before each checkpoint and evaluation (`sync_buffers`), so saved and evaluated models are
consistent. `true` makes DDP broadcast them at every wrapped forward: on an H100 (torch 2.11) that raised
"modified by an inplace operation" in the D step, whose two forwards precede one backward.
`dist.sync_batchnorm=true` (CUDA only) converts every
BatchNorm to SyncBatchNorm: statistics over the global batch, which changes the model's maths.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from rgan_dist.engine.strategy import DistributedStrategy
from rgan_dist.errors import ConfigError


class DDPStrategy(DistributedStrategy):
    name = "ddp"

    def prepare(self, G: nn.Module, D: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.cfg.dist.sync_batchnorm:
            if self.device.type != "cuda":
                raise ConfigError("dist.sync_batchnorm=true: SyncBatchNorm needs CUDA devices; set it false on CPU")
            G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
        self._place(G, D)
        self.opt = self._optimizers()
        kw: dict[str, Any] = {"device_ids": [self.device.index] if self.device.type == "cuda" else None}
        # torch >= 2.13 renamed the per-forward buffer broadcast; both still sync everything at wrap time.
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kw["forward_sync_buffers"] = self.cfg.dist.broadcast_buffers
        else:
            kw["broadcast_buffers"] = self.cfg.dist.broadcast_buffers
        # Gradients live in DDP's all-reduce buckets instead of being copied there and back after each
        # backward (less memory, one copy fewer per parameter per step).
        kw["gradient_as_bucket_view"] = True
        # Wrapping broadcasts rank 0's parameters and buffers: every rank starts from the same models.
        self.g_ddp = DDP(self.G, **kw)
        self.d_ddp = DDP(self.D, **kw)
        # compiled (train.compile), the step functions call the wrappers: DDP's graph breaks at bucket boundaries
        self._set_forwards(self.g_ddp, self.d_ddp)

    def _release(self) -> None:
        # The raw modules stay usable (eval, samples); only the wrappers go.
        if hasattr(self, "g_ddp"):
            del self.g_ddp, self.d_ddp
            self._set_forwards(self.G, self.D)
