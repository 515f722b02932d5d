"""Shards -> uint8 batches on every rank and DataLoader worker, deterministic and resumable.

Why not `wds.WebDataset(...).with_epoch(...)`: its node/worker splitting deals out whole shards
(it refuses, or starves workers, when shards are fewer than ranks x workers; uneven shards give
ranks different batch counts and hang DDP), and a resampled stream cannot be resumed without
replaying images. Here the split is computed, not streamed:

* The data is L = world_size x K streams (K = DataLoader workers per rank, at least 1). Stream
  g = rank * K + k serves the global batches t with t % K == k (t counts batches since epoch 0 on
  this rank), which is exactly the order in which a DataLoader collects batches from its workers.
* Every epoch has the same `batches_per_epoch` on every rank: samples_per_epoch // (B x world).
* Epoch e permutes the shards (seed, e), lays their samples end to end and gives each stream a
  contiguous range sized to the batches it owes this epoch, so streams read disjoint samples even
  when shards are fewer than streams or uneven; a stream reads only the shards its range touches.
  Only if its range runs short (more batches asked than samples, a broken shard) does a stream
  resample random shards with its own (seed, epoch, rank, k) generator.
* Within a stream, a shuffle buffer over raw (undecoded) samples, seeded likewise. Batch c of a
  stream is always raw samples [cB, (c+1)B) of that stream; a corrupt sample is counted and its
  slot filled with another image of the same batch. So the content of every batch is a function of
  (seed, epoch, rank, batch) and the geometry (B, world, K) only: resuming at (epoch, batch) skips
  the consumed raw samples without decoding them and yields exactly the batches the interrupted run
  would have yielded next.
* Batches are decoded straight into channels_last tensors (NHWC storage viewed as [B, 3, R, R]).

webdataset provides the URL opening (`gopen`: pipe:, curl for http) and the sample grouping rule
(`base_plus_ext`); tar members are read by `tarstream` (8x faster than tarfile, see there). One shard
is read, and checked against the manifest (counts, sha256 per `verify`), by `verify`.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.images import BadImage, decode_square
from data_pipeline.shardset import ShardSet, resolve
from data_pipeline.verify import ReadStats, ShardCheck, guarded, iter_shard_samples, shard_checks
from data_pipeline.workers import worker_init, worker_start_method

__all__ = ["BatchIterator", "iter_images", "iter_sample_range", "iter_shard_samples", "make_batch_iterator"]

log = logging.getLogger("data_pipeline")
_MAX_BAD_RUN = 10_000  # consecutive undecodable samples before giving up on a data set


def _shuffled(it: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    draws: Iterator[int] = iter(())
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = next(draws, None)
        if j is None:  # random indices in blocks: one numpy call per 1024 samples, not per sample
            draws = iter(rng.integers(size, size=1024).tolist())
            j = next(draws)
        yield buf[j]
        buf[j] = x
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


# ---- the plan: who reads what, computed identically on every rank and worker ----


@dataclass(frozen=True)
class _Plan:
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard (estimated when unknown)
    batch_size: int
    world_size: int
    rank: int
    streams: int  # K: logical streams per rank = DataLoader workers (1 when reading in-process)
    seed: int
    batches_per_epoch: int
    resolution: int
    shuffle_buffer: int
    checks: tuple[ShardCheck, ...] = ()  # per shard: what the manifest says, and data.verify

    def batches_of(self, epoch: int, k: int, before: int | None = None) -> int:
        """Batches of epoch `epoch` (those with index < `before` if given) served by stream k."""
        end = self.batches_per_epoch if before is None else before
        j0 = (k - epoch * self.batches_per_epoch) % self.streams  # first batch index of stream k
        return 0 if j0 >= end else (end - 1 - j0) // self.streams + 1

    def segments(self, epoch: int, rank: int, k: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end sample) pieces of stream (rank, k)'s range in `epoch`."""
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.urls))
        sizes = [self.counts[i] for i in perm]
        total = sum(sizes)
        needs = [
            self.batches_of(epoch, kk) * self.batch_size for _ in range(self.world_size) for kk in range(self.streams)
        ]
        want = sum(needs)
        alloc = [total * n // want for n in needs]
        for i in range(total - sum(alloc)):  # hand out the remainder, one sample each, in stream order
            alloc[i % len(alloc)] += 1
        g = rank * self.streams + k
        start = sum(alloc[:g])
        end = start + alloc[g]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        out = []
        i = bisect.bisect_right(offsets, start) - 1
        while start < end and i < len(sizes):
            lo = start - offsets[i]
            hi = min(sizes[i], end - offsets[i])
            if hi > lo:
                out.append((int(perm[i]), lo, hi))
            start = offsets[i] + hi
            i += 1
        return out

    def _check(self, si: int) -> ShardCheck | None:
        return self.checks[si] if self.checks else None

    def own(self, epoch: int, k: int, stats: ReadStats) -> Iterator[tuple[str, bytes | None]]:
        """Stream (rank, k)'s own range of `epoch`, unshuffled."""
        for si, lo, hi in self.segments(epoch, self.rank, k):
            yield from guarded(self.urls[si], lo, hi, stats, self._check(si))

    def raw_stream(
        self, epoch: int, k: int, stats: ReadStats, own: Iterator[tuple[str, bytes | None]]
    ) -> Iterator[tuple[str, bytes | None]]:
        """Stream (rank, k)'s raw samples for `epoch`: its own range shuffled, then resampled shards."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, k, 1])

        def resampled() -> Iterator[tuple[str, bytes | None]]:
            pick = np.random.default_rng([self.seed, epoch, self.rank, k, 2])
            empty = 0
            while True:
                got = 0
                si = int(pick.integers(len(self.urls)))
                for sample in guarded(self.urls[si], 0, None, stats, self._check(si)):
                    got += 1
                    yield sample
                empty = 0 if got else empty + 1
                if empty > 3 * len(self.urls) + 10:
                    raise DataError(f"no readable sample in any of the {len(self.urls)} shards; last failure: "
                                    f"{stats.last_error or 'none, they hold no samples'}")

        yield from _shuffled(own, self.shuffle_buffer, rng)
        yield from _shuffled(resampled(), self.shuffle_buffer, rng)

    def epoch_batches(
        self, epoch: int, k: int, first: int, stats: ReadStats, buffer: Callable[[int], torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream k's batches of `epoch` from its local batch `first` on (resume), as (t, NHWC tensor).

        `buffer(t)` gives the uint8 [B, R, R, 3] tensor to decode global batch t into.
        """
        b = self.batch_size
        own = self.own(epoch, k, stats)
        it = self.raw_stream(epoch, k, stats, own)
        for _ in range(first * b):  # resume: skip consumed samples without decoding them
            next(it)
        fill = np.random.default_rng([self.seed, epoch, self.rank, k, 3])
        j0 = (k - epoch * self.batches_per_epoch) % self.streams
        for c in range(first, self.batches_of(epoch, k)):
            t = epoch * self.batches_per_epoch + j0 + c * self.streams
            out = buffer(t)
            view = out.numpy()
            good: list[int] = []
            bad: list[int] = []
            for i in range(b):
                key, data = next(it)
                (good if self._decode_into(view, i, key, data, stats) else bad).append(i)
            run = 0
            while not good:  # the whole batch was unreadable: take further samples for slot 0
                key, data = next(it)
                if self._decode_into(view, 0, key, data, stats):
                    good.append(0)
                run += 1
                if run > _MAX_BAD_RUN:
                    raise RuntimeError(f"more than {_MAX_BAD_RUN} consecutive unreadable samples in {self.urls[0]} ...")
            for i in bad:
                if i not in good:
                    view[i] = view[good[int(fill.integers(len(good)))]]
            yield t, out
        for _ in own:  # the rest of the range, read undecoded: its shards' ends are verified this epoch too
            pass

    def _decode_into(self, view: np.ndarray, i: int, key: str, data: bytes | None, stats: ReadStats) -> bool:
        try:
            if data is None:
                raise BadImage("sample has no image member")
            view[i] = decode_square(data, self.resolution)
            return True
        except BadImage as exc:
            stats.skipped += 1
            stats.warn(f"skipping sample {key}: {exc}")
            return False


class _StreamDataset(IterableDataset):
    """One logical stream per DataLoader worker; infinite (epochs follow each other).

    Items: (batch [B,3,R,R] channels-last, ring sequence tensor, ring slot, t, skipped, shard errors,
    CPU seconds this worker has used so far).

    In a worker process, batches are decoded into a small ring of shared-memory buffers made once,
    instead of fresh tensors: a fresh tensor is copied into new shared memory by the DataLoader for
    every batch, which on 256^2 images cost a third of the decode time. Reuse is safe because the
    DataLoader (in-order, `prefetch` indices per worker) sends a worker the index of its batch m only
    after the main process has received its batch m - prefetch, and the main process copies each
    batch out of the ring as it receives it: a ring of prefetch + 2 buffers is never overwritten
    while still unread. `seq[slot]` holds the t a buffer currently contains (-1 while it is being
    written), so the main process verifies this instead of trusting it.
    """

    def __init__(self, plan: _Plan, start: int, ring: int):
        self.plan = plan
        self.start = start  # global batch index t of the first batch to produce
        self.ring = ring

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int, int, int, int, float]]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        p = self.plan
        k = (self.start + slot) % p.streams  # worker slot 0 gets batch `start`, slot 1 the next...
        epoch, batch0 = divmod(self.start, p.batches_per_epoch)
        first = p.batches_of(epoch, k, before=batch0)
        stats = ReadStats()
        shape = (p.batch_size, p.resolution, p.resolution, 3)
        shared = info is not None
        bufs = [torch.empty(shape, dtype=torch.uint8).share_memory_() for _ in range(self.ring)] if shared else []
        seq = torch.full((self.ring,), -1, dtype=torch.int64).share_memory_() if shared else None

        def buffer(t: int) -> torch.Tensor:
            if seq is None:  # in-process: nothing to share, a fresh tensor per batch
                return torch.empty(shape, dtype=torch.uint8)
            seq[(t // p.streams) % self.ring] = -1  # this worker's batches have consecutive t // K
            return bufs[(t // p.streams) % self.ring]

        try:
            while True:
                for t, nhwc in p.epoch_batches(epoch, k, first, stats, buffer):
                    r = (t // p.streams) % self.ring
                    if seq is not None:
                        seq[r] = t
                    # NHWC storage viewed as [B, 3, R, R] (channels_last): no per-image transpose here.
                    cpu = time.process_time()
                    yield nhwc.permute(0, 3, 1, 2), seq, r, t, stats.skipped, stats.shard_errors, cpu
                epoch, first = epoch + 1, 0
        except DataError as exc:  # handed over as an item: the DataLoader would wrap it in a traceback
            yield exc


class BatchIterator:
    """Infinite iterator of uint8 [B, 3, R, R] CPU tensors (pinned when the device is CUDA).

    The tensors are channels_last (NHWC storage, as images decode): transposing every image to
    NCHW on the CPU cost ~10% of the decode time. Shape-generic ops (`.to()`, `.float()`,
    `flip`, convolutions) work as is; call `.contiguous()` on the device if NCHW storage is needed
    (`.view()` needs it; `.reshape()` does not).

    `state()` is what a checkpoint stores; pass its epoch/batch/skipped back as start_epoch /
    start_batch / start_skipped to resume. Exact resume needs the same batch size, world size,
    worker count and seed (they are in the state, so a caller can check).
    """

    def __init__(self, plan: _Plan, *, workers: int, start: int, start_skipped: int, pin: bool, prefetch: int):
        self._plan = plan
        self._workers = workers
        self._start = start
        self._t = start
        self._base_skipped = start_skipped
        self._slot_stats: dict[int, tuple[int, int, float]] = {}
        self._pin = pin
        self._prefetch = prefetch
        self._it: Iterator[Any] | None = None
        self._ring_views: dict[tuple[int, int], torch.Tensor] = {}
        self.resolution = plan.resolution
        self.stored_resolution: int | None = None  # the images' side as stored (manifest), when known

    @property
    def batches_per_epoch(self) -> int:
        return self._plan.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._t // self._plan.batches_per_epoch

    @property
    def batch(self) -> int:
        """Batches consumed in the current epoch."""
        return self._t % self._plan.batches_per_epoch

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far by all workers of this rank (as of the batches consumed)."""
        return self._base_skipped + sum(s[0] for s in self._slot_stats.values())

    @property
    def shard_errors(self) -> int:
        return sum(s[1] for s in self._slot_stats.values())

    @property
    def worker_cpu_seconds(self) -> float:
        """CPU seconds the DataLoader workers had used when they produced the latest batches consumed.

        The difference between two readings is the CPU cost of the batches consumed in between: a
        cheap way to see whether data loading can keep up (with workers=0 it is this process's time).
        """
        return sum(s[2] for s in self._slot_stats.values())

    def state(self) -> dict[str, int]:
        p = self._plan
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "skipped": self.skipped,
            "shard_errors": self.shard_errors,
            "batches_per_epoch": p.batches_per_epoch,
            "batch_size": p.batch_size,
            "world_size": p.world_size,
            "workers": self._workers,
            "seed": p.seed,
        }

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            loader = DataLoader(
                _StreamDataset(self._plan, self._start, ring=self._prefetch + 2),
                batch_size=None,
                num_workers=self._workers,
                pin_memory=self._pin,
                prefetch_factor=self._prefetch if self._workers else None,
                worker_init_fn=worker_init if self._workers else None,
                multiprocessing_context=worker_start_method() if self._workers else None,
            )
            self._it = iter(loader)
        item = next(self._it)
        if isinstance(item, DataError):
            self.close()
            raise DataError(str(item))
        batch, seq, r, t, skipped, shard_errors, cpu = item
        if t != self._t:  # the stream/worker mapping of the module docstring no longer holds
            raise RuntimeError(f"data reader: expected batch {self._t}, a worker delivered batch {t}")
        worker = (t - self._start) % self._plan.streams
        if seq is not None:
            self._ring_views[(worker, r)] = batch  # keeps the shared mapping cached in this process
            if not self._pin:  # (pinning already copied it out of the ring)
                # A numpy copy of the NHWC storage: torch's clone() would run on the intra-op thread
                # pool, which on a busy host cost 10x the memcpy in CPU time (OpenMP spin-waits).
                batch = torch.from_numpy(np.array(batch.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
            if int(seq[r]) != t:
                raise RuntimeError("data reader: a shared batch buffer was overwritten before it was read")
        self._slot_stats[worker] = (int(skipped), int(shard_errors), float(cpu))
        self._t += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the iterator is garbage collected)."""
        it, self._it = self._it, None
        self._ring_views.clear()
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments win; else torch.distributed when initialised; else RANK/WORLD_SIZE; else 0/1."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not valid for world size {world_size}")
    return rank, world_size


def make_batch_iterator(
    spec: str,
    *,
    batch_size: int,
    resolution: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 2,
    seed: int = 0,
    start_epoch: int = 0,
    start_batch: int = 0,
    samples_per_epoch: int | None = None,
    device: torch.device | str | None = None,
    start_skipped: int = 0,
    shuffle_buffer: int = 256,
    prefetch: int = 2,
    verify: str = "first",
) -> BatchIterator:
    """The training reader (see the module docstring for the split, resume and skip rules).

    `spec`: shard folder, manifest.json (path or URL), brace URL list, or sklearn:digits.
    `resolution`: output side; None = the manifest's (shards at another size are centre-cropped
    and resized on the fly). `samples_per_epoch` defaults to the manifest's num_samples (required
    for remote shards without a manifest). rank/world_size are looked up only when not given.
    `verify`: when shards' sha256 are checked against the manifest (off|first|always, see `verify`).
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("workers", workers, 0),
        ("shuffle_buffer", shuffle_buffer, 1),
        ("start_epoch", start_epoch, 0),
        ("start_batch", start_batch, 0),
        ("prefetch", prefetch, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"data reader: {name} must be an integer >= {low}, got {value!r}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 2):
        raise DataError(f"data reader: resolution must be an integer >= 2, got {resolution!r}")
    rank, world_size = rank_and_world(rank, world_size)
    shards = resolve(spec, resolution=resolution)
    counts = shards.counts
    checks = shard_checks(counts, shards.digests, len(shards.urls), verify)
    if samples_per_epoch is None:
        if counts is None:
            why = shards.why_no_counts or "no manifest"
            raise DataError(f"cannot size an epoch of {spec!r}: its sample counts are unknown ({why}); "
                            f"put the manifest.json that `rgan shards` wrote beside the shards")
        samples_per_epoch = sum(counts)
    if samples_per_epoch < 1:
        raise DataError(f"data set {spec!r} holds no samples")
    if counts is None:
        n = len(shards.urls)
        counts = tuple([-(-samples_per_epoch // n)] * n)
    if sum(counts) == 0:
        raise DataError(f"data set {spec!r} holds no samples")
    res = resolution or shards.resolution or _probe_resolution(shards)
    bpe = max(1, samples_per_epoch // (batch_size * world_size))
    if start_batch >= bpe:
        log.warning(
            "start_batch %d >= batches_per_epoch %d (geometry changed?): continuing at the next epoch", start_batch, bpe
        )
        start_epoch, start_batch = start_epoch + 1, 0
    plan = _Plan(
        urls=shards.urls,
        counts=tuple(counts),
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        streams=max(1, workers),
        seed=seed,
        batches_per_epoch=bpe,
        resolution=res,
        shuffle_buffer=shuffle_buffer,
        checks=checks,
    )
    dev = torch.device(device) if device is not None else None
    pin = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
    it = BatchIterator(
        plan,
        workers=workers,
        start=start_epoch * bpe + start_batch,
        start_skipped=start_skipped,
        pin=pin,
        prefetch=prefetch,
    )
    it.stored_resolution = shards.resolution  # the manifest's (None: unknown): a caller says when it resizes
    return it


def _probe_resolution(shards: ShardSet) -> int:
    """No manifest and no resolution given: use the first decodable image's shorter side."""
    for url in shards.urls[:3]:
        for _, data in iter_shard_samples(url, 0, 50):
            if data is None:
                continue
            try:
                h, w = decode_square(data, None).shape[:2]
            except BadImage:
                continue
            return min(h, w)
    raise DataError(f"cannot tell the image size of {shards.urls[0]} ...: pass a resolution")


def shard_pieces(shards: ShardSet, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """(url, first, end) of every shard holding part of samples [lo, hi) of a set with known counts, in
    manifest order: the one place a global sample range is mapped onto shards (shards outside it are
    never opened)."""
    if shards.counts is None:
        raise DataError(f"shards {shards.urls[0]} ...: sample counts are unknown, so a sample range cannot be read")
    pieces, start = [], 0
    for url, n in zip(shards.urls, shards.counts, strict=True):
        a, b = max(lo, start), min(hi, start + n)
        if b > a:
            pieces.append((url, a - start, b - start))
        start += n
    return pieces


def _decoded(url: str, samples: Iterator[tuple[str, bytes | None]], resolution: int | None,
             skip: Callable[[str, str, BadImage], None]) -> Iterator[np.ndarray]:
    """Decode one shard's samples as training does; a corrupt sample goes to `skip(key, url, exc)`."""
    for key, data in samples:
        try:
            if data is None:
                raise BadImage("sample has no image member")
            yield decode_square(data, resolution)
        except BadImage as exc:
            skip(key, url, exc)


def _log_skip(key: str, url: str, exc: BadImage) -> None:
    log.warning("skipping sample %s of %s: %s", key, url, exc)


def iter_sample_range(
    shards: ShardSet, lo: int, hi: int, *, resolution: int | None = None,
    skip: Callable[[str, str, BadImage], None] = _log_skip,
) -> Iterator[np.ndarray]:
    """Samples [lo, hi) of a shard set with known counts, in manifest order, as uint8 HxWx3.

    `resolution` R decodes exactly as the training reader does (`decode_square(data, R)`: the stored size
    kept when already R x R, else the same fit/resize); None keeps the stored size. A corrupt sample is
    handed to `skip(key, url, exc)` and left out. Unlike training's stream, a shard that cannot be read
    raises: a statistic over a silently smaller set (FID's reference) would be wrong.
    """
    checks, verified = _checks_by_url(shards), set[str]()
    for url, a, b in shard_pieces(shards, lo, hi):
        yield from _decoded(url, iter_shard_samples(url, a, b, check=checks[url], verified=verified), resolution, skip)


def iter_images(
    spec: str, *, rank: int | None = None, world_size: int | None = None, resolution: int | None = None
) -> Iterator[np.ndarray]:
    """Every sample of a shard set exactly once across ranks, in manifest order, as uint8 HxWx3.

    Rank r gets the contiguous slice [r N / w, (r+1) N / w) of the samples (shards outside it are
    not opened). Images come as stored unless `resolution` is given. Corrupt samples are logged and
    left out. Without known counts (remote shards, no manifest) ranks take whole shards r, r+w, ...
    """
    rank, world_size = rank_and_world(rank, world_size)
    shards = resolve(spec, resolution=resolution)
    stats = ReadStats()
    if shards.counts is None:
        pieces: list[tuple[str, int, int | None]] = [(u, 0, None) for u in shards.urls[rank::world_size]]
    else:
        total = sum(shards.counts)
        pieces = list(shard_pieces(shards, rank * total // world_size, (rank + 1) * total // world_size))

    def skip(key: str, url: str, exc: BadImage) -> None:
        stats.skipped += 1
        stats.warn(f"skipping sample {key} of {url}: {exc}")

    checks = _checks_by_url(shards)
    for url, a, b in pieces:
        yield from _decoded(url, guarded(url, a, b, stats, checks[url]), resolution, skip)


def _checks_by_url(shards: ShardSet, verify: str = "first") -> dict[str, ShardCheck]:
    """Reads of whole shard sets (FID references, `iter_images`) verify what they read through too."""
    return dict(zip(shards.urls, shard_checks(shards.counts, shards.digests, len(shards.urls), verify), strict=True))
