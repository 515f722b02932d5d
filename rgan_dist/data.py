"""Batches for the loop: an infinite iterator of uint8 [B, C, R, R] tensors with a resumable position.

The loop only sees this interface (`next()`, `.state()`, `.skipped`), whatever fills it: the
WebDataset shard reader of `data_pipeline` for real collections, or the in-memory embedded data set
(scikit-learn's 1797 real handwritten digits) for the demo and tests. Normalisation to [-1, 1] and
flips happen on the device (`to_model_input`), not per sample in Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from rgan_dist.config import Config

BUILTIN_PREFIX = "sklearn:"
DIGITS_SIDE = 8  # scikit-learn's digits are 8x8


class BatchIterator(Protocol):
    skipped: int

    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def __next__(self) -> torch.Tensor: ...
    def state(self) -> dict[str, Any]: ...


def load_digits_uint8(resolution: int, channels: int = 3) -> torch.Tensor:
    """scikit-learn's digits (8x8, values 0..16) as uint8 [1797, C, R, R], upscaled bilinearly."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    if resolution != DIGITS_SIDE:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, channels, -1, -1).contiguous()


class InMemoryBatches:
    """Shuffled batches of a tensor held in memory, split across ranks like the shard reader.

    Epoch e of rank r draws a permutation from (seed, e): ranks take disjoint slices of it, and every
    rank yields the same number of batches per epoch (the remainder is dropped), so DDP never waits on a
    rank that ran out. The position (epoch, batch) is the whole state: resuming replays nothing.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_epoch: int = 0, start_batch: int = 0) -> None:
        per_rank = len(images) // world_size
        if per_rank < batch_size:
            raise ValueError(f"{len(images)} images over {world_size} ranks cannot fill a batch of {batch_size}")
        self.images, self.batch_size, self.rank, self.world_size, self.seed = (
            images, batch_size, rank, world_size, seed)
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.batch = start_epoch, start_batch
        self.skipped = 0
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.images), generator=g)
        per_rank = len(self.images) // self.world_size
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> InMemoryBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        return self.images[idx]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "skipped": self.skipped}


def make_batches(cfg: Config, *, rank: int, world_size: int, device: torch.device,
                 state: dict[str, Any] | None = None) -> BatchIterator:
    """The training stream of this rank, resumed at `state` (a previous iterator's `.state()`)."""
    state = state or {}
    spec = cfg.data.shards
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name != "digits":
            from rgan_dist.errors import ConfigError

            raise ConfigError(f"data.shards={spec!r}: the only embedded data set is sklearn:digits")
        images = load_digits_uint8(cfg.model.resolution, cfg.model.channels)
        if rank == 0:
            announce_resize(spec, DIGITS_SIDE, cfg.model.resolution, "upscaled bilinearly", "")
        return InMemoryBatches(images, cfg.train.batch_size, rank=rank, world_size=world_size,
                               seed=cfg.train.seed, start_epoch=state.get("epoch", 0),
                               start_batch=state.get("batch", 0))
    from data_pipeline.reader import make_batch_iterator

    it = make_batch_iterator(spec, batch_size=cfg.train.batch_size, resolution=cfg.model.resolution,
                             rank=rank, world_size=world_size, workers=cfg.data.workers,
                             seed=cfg.train.seed, start_epoch=state.get("epoch", 0),
                             start_batch=state.get("batch", 0), start_skipped=state.get("skipped", 0),
                             device=device, verify=cfg.data.verify)
    if rank == 0 and it.stored_resolution:
        announce_resize(spec, it.stored_resolution, cfg.model.resolution, "centre-cropped and resized as read",
                        f" (shards written with --resolution {cfg.model.resolution} skip this)")
    return it


def announce_resize(spec: str, stored: int, resolution: int, how: str, tip: str) -> None:
    """One info line when the training images are not stored at `model.resolution`: the reader resizes
    them on the fly, which is right for a quick try but costs decode time and is easy to miss (a 256^2
    shard set trained at 64 spends most of its reader time resizing). Silent when the sizes agree."""
    if stored != resolution:
        print(f"rgan: data.shards={spec} holds {stored}x{stored} images; model.resolution={resolution}: "
              f"{how} to {resolution}x{resolution}{tip}", flush=True)


def to_model_input(batch: torch.Tensor, device: torch.device, *, channels_last: bool = False,
                   flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B,C,R,R] on the host -> float [-1, 1] on the device, optionally randomly mirrored."""
    x = batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if flip:
        mask = torch.rand(x.shape[0], 1, 1, 1, device=device, generator=generator) < 0.5
        x = torch.where(mask, x.flip(3), x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
