"""Inception features of generated samples and of data sets, computed on every rank and gathered.

The invariant that makes FID independent of the world size: every item (a generated sample or an
image of a data set) has a global index, rank r processes the contiguous index range
[r*N/world, (r+1)*N/world) (`share`), and the gathered features are concatenated in rank order, which
is the global order whatever the world size. Generated sample i draws its noise from a generator
seeded by (seed, batch index) only, so 1 rank and 16 ranks embed identical images in identical order.
A data set's first N images in manifest (or sorted file) order are the N used, whatever the world size.

Every rank returns the same full feature tensor; the collectives are entered by all ranks in the same
order (one counts all_gather, one padded all_gather per call), so callers must call these functions
on every rank.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from data_pipeline.identity import content_sha256
from rgan_dist.errors import UsageError
from rgan_dist.metrics.fid import FeatureStats, compare_stats
from rgan_dist.metrics.inception import FEATURE_DIM, InceptionNetwork

log = logging.getLogger("rgan_dist.metrics")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
STATS_PREFIX = "fid-stats"

SampleFn = Callable[[int, torch.Generator], torch.Tensor]


# ------------------------------------------------------------------------------------------- ranks


def rank_world() -> tuple[int, int]:
    """torch.distributed's rank and world size when a group is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(total: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous [lo, hi) slice of `total` items that `rank` processes (sizes differ by <= 1)."""
    return rank * total // world, (rank + 1) * total // world


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of global batch `batch_index`: a function of (seed, index) only, never of rank or world size."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # 63 bits: torch seeds must fit an int64


def _gather_device(local: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return local.device if local.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """All ranks' [n_r, D] rows concatenated in rank order, on every rank.

    Shares may differ in size (uneven splits, skipped corrupt images), and all_gather needs equal
    shapes: the counts are gathered first and every share padded to the largest, then trimmed.
    """
    rank, world = rank_world()
    if world == 1:
        return local
    dev = _gather_device(local)
    local = local.to(dev)
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    counts_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts_t, n)
    counts = [int(c.item()) for c in counts_t]
    longest = max(counts)
    if longest == 0:
        return local[:0]
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (identity without a process group)."""
    _, world = rank_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    """The feature pass's bar: only on a terminal. It sits under the training bar (position 1), and tqdm moves
    between the two with cursor-up escapes, which a log file (or Ray's captured worker output) kept as `[A`
    fragments in front of the FID lines; the training bar alone (position 0) writes none."""
    rank, _ = rank_world()
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or rank != 0 or not sys.stderr.isatty(),
                leave=False)


# ------------------------------------------------------------------------------ generated samples


def compute_generator_features(
    sample_fn: SampleFn,
    num_samples: int,
    batch_size: int,
    *,
    network: InceptionNetwork,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generated",
) -> torch.Tensor:
    """Features [num_samples, 2048] float32 of generated images, identical on every rank.

    `sample_fn(b, generator)` returns uint8 [b, C, H, W] (C = 1 or 3); it must draw all its randomness
    from `generator` (a torch.Generator on `device`, default the network's device), which is seeded
    per global batch (`batch_seed(seed, k)`), so sample i is the same image with 1 or 16 ranks as long
    as `batch_size` is the same. Put the generator in eval mode first (BatchNorm in train mode would
    make a sample depend on its batch). Global batches are split contiguously across ranks.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    rank, world = rank_world()
    device = torch.device(device) if device is not None else network.device
    num_batches = math.ceil(num_samples / batch_size)
    lo, hi = share(num_batches, rank, world)
    feats: list[torch.Tensor] = []
    with _progress(num_samples, desc, progress) as bar:
        for k in range(lo, hi):
            b = min(batch_size, num_samples - k * batch_size)
            gen = torch.Generator(device=device)
            gen.manual_seed(batch_seed(seed, k))
            with torch.no_grad():
                images = sample_fn(b, gen)
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
                raise TypeError("sample_fn must return a uint8 tensor [b, C, H, W]")
            if images.shape[0] != b:
                raise ValueError(f"sample_fn returned {images.shape[0]} images, {b} were asked for")
            feats.append(network.embed(images))
            bar.update(min(b * world, bar.total - bar.n))
    local = torch.cat(feats) if feats else torch.empty((0, FEATURE_DIM), device=network.device)
    return gather_rows(local)


# ----------------------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class ImageSource:
    """A folder of images (recursive, sorted by relative path) or a shard set (data_pipeline spec)."""

    spec: str
    kind: str  # "folder" | "shards"
    total: int | None  # images available, when known
    files: tuple[Path, ...] = ()
    shards: Any = field(default=None, compare=False)  # data_pipeline.shardset.ShardSet

    def describe(self) -> str:
        count = "?" if self.total is None else str(self.total)
        return f"{self.kind} {self.spec} ({count} images)"


def _looks_like_shards(spec: str) -> bool:
    if spec.startswith("sklearn:") or "{" in spec or "::" in spec or "://" in spec or spec.startswith("pipe:"):
        return True
    p = Path(spec)
    if p.is_dir():
        return (p / "manifest.json").is_file() or any(p.glob("*.tar"))
    return p.suffix in (".json", ".tar")


def open_source(spec: str) -> ImageSource:
    """Classify `spec`: a shard set (manifest, shard folder, brace/remote URL list, sklearn:digits) or,
    for any other local folder, a folder of images."""
    spec = str(spec)
    if _looks_like_shards(spec):
        from data_pipeline.shardset import resolve

        shards = resolve(spec)
        return ImageSource(spec, "shards", shards.num_samples, shards=shards)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UsageError(f"{spec!r} is neither a folder of images nor a shard set (folder, manifest.json, URLs)")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        exts = " ".join(sorted(IMAGE_SUFFIXES))
        raise UsageError(f"folder {spec} holds no images (searched recursively for {exts})")
    return ImageSource(spec, "folder", len(files), files=tuple(files))


def _decode_file(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise UsageError(f"cannot read image {path}: {type(exc).__name__}: {exc}; remove or fix it") from exc


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return _decode_file(self.files[i])


def _iter_files(files: list[Path], workers: int) -> Iterator[np.ndarray]:
    if workers <= 0:
        for f in files:
            yield _decode_file(f)
        return
    loader = torch.utils.data.DataLoader(
        _FileDataset(files), batch_size=None, num_workers=workers, collate_fn=lambda x: x, prefetch_factor=4
    )
    yield from loader


def _skip_sample(key: str, url: str, exc: Exception) -> None:
    log.warning("FID: skipping sample %s of %s: %s", key, url, exc)


def _iter_share(src: ImageSource, n: int | None, rank: int, world: int, workers: int,
                resolution: int | None = None) -> Iterator[np.ndarray]:
    if src.kind == "folder":
        lo, hi = share(n if n is not None else len(src.files), rank, world)
        yield from _iter_files(list(src.files[lo:hi]), workers)
    elif src.total is not None:
        from data_pipeline.reader import iter_sample_range

        lo, hi = share(n if n is not None else src.total, rank, world)
        # decoded at `resolution` exactly as training decodes (None: as stored), a failed shard fatal
        yield from iter_sample_range(src.shards, lo, hi, resolution=resolution, skip=_skip_sample)
    else:
        # Remote shards without a manifest: sample counts are unknown, so ranks take whole shards
        # (data_pipeline's split) and the set of images used then depends on the world size.
        from data_pipeline import iter_images

        if world > 1:
            log.warning("FID: %s has no manifest; with %d ranks the images used depend on the world size",
                        src.spec, world)  # fmt: skip
        limit = None if n is None else share(n, rank, world)[1] - share(n, rank, world)[0]
        for i, img in enumerate(iter_images(src.spec, rank=rank, world_size=world, resolution=resolution)):
            if limit is not None and i >= limit:
                break
            yield img


def compute_dataset_features(
    source: str | ImageSource,
    *,
    network: InceptionNetwork,
    num_samples: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
    desc: str | None = None,
    resolution: int | None = None,
) -> torch.Tensor:
    """Features [N, 2048] of the first N images of a folder or shard set, identical on every rank.

    N = min(num_samples, images available) (all when None). Images of different sizes are fine: a
    batch is cut where the size changes. `workers` > 0 decodes folder images in DataLoader workers.
    `resolution`: decode shard images at this size the way training does (`data_pipeline.reader`'s
    `iter_sample_range`); folder images are always used as stored.
    """
    src = source if isinstance(source, ImageSource) else open_source(source)
    rank, world = rank_world()
    n = src.total if num_samples is None else (num_samples if src.total is None else min(num_samples, src.total))
    feats: list[torch.Tensor] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            batch = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2)
            feats.append(network.embed(batch))
            bar.update(min(len(pending) * world, bar.total - bar.n) if bar.total else len(pending) * world)
            pending.clear()

    with _progress(n or 0, desc or Path(src.spec).name or src.spec, progress) as bar:
        for img in _iter_share(src, n, rank, world, workers, resolution):
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            if pending and (img.shape != pending[0].shape or len(pending) == batch_size):
                flush()
            pending.append(img)
        flush()
    local = torch.cat(feats) if feats else torch.empty((0, FEATURE_DIM), device=network.device)
    return gather_rows(local)


# ------------------------------------------------------------------------------------- statistics


def network_meta(network: InceptionNetwork) -> dict[str, Any]:
    """The provenance every FeatureStats (and so every FID) carries."""
    info = network.info
    return {
        "network_source": info.source,
        "network_path": info.path,
        "network_sha256": info.sha256,
        "network_convention": info.convention,
        "resolution": info.resolution,
        "resize": info.resize,
    }


def dataset_identity(src: ImageSource, resolution: int | None = None) -> dict[str, Any] | None:
    """What a shard set's reference statistics depend on besides the network: the shards' content (the
    manifest's sha256 list, in order), how they are stored (resolution, format) and the size they are
    decoded at. Rewriting shards into the same folder changes `dataset_sha256`
    (`data_pipeline.identity.content_sha256`), so a cached file of the old set is never taken for the new
    one. None when the content cannot be identified (then nothing is cached)."""
    if src.kind != "shards" or src.shards is None:
        return None
    digest = content_sha256(src.shards)
    if digest is None:
        return None
    manifest = src.shards.manifest or {}
    return {"dataset_sha256": digest, "stored_resolution": manifest.get("resolution"),
            "image_format": manifest.get("format"), "image_resolution": resolution}


def stats_cache_name(network: InceptionNetwork, n: int, dataset: dict[str, Any] | None = None) -> str:
    """File name of cached reference statistics: the key is network hash, resolution, resize and N, plus
    (for a shard set) the data set's identity and the size its images are decoded at
    (`dataset_identity`); the same keys are checked again inside the file (`_usable`)."""
    info = network.info
    data = ""
    if dataset is not None:
        res = dataset.get("image_resolution")
        data = f"_r{res if res is not None else 'native'}_d{str(dataset['dataset_sha256'])[:12]}"
    return f"{STATS_PREFIX}_{info.sha256[:16]}_{info.resolution}px_{info.resize}{data}_n{n}.npz"


def _cache_path(src: ImageSource, network: InceptionNetwork, n: int | None,
                dataset: dict[str, Any] | None) -> Path | None:
    if src.kind != "shards" or n is None or dataset is None:
        return None
    folder = src.shards.local_dir if src.shards is not None else None
    return None if folder is None else Path(folder) / stats_cache_name(network, n, dataset)


def _usable(stats: FeatureStats, network: InceptionNetwork, keep_features: bool, *, n: int | None = None,
            dataset: dict[str, Any] | None = None) -> bool:
    """A cached file counts only if every key it was computed under is today's: network, resize, N and
    the data set's identity (content, stored size and format, decode size)."""
    meta = network_meta(network)
    same = all(stats.meta.get(k) == meta[k] for k in ("network_sha256", "resolution", "resize"))
    same = same and (n is None or stats.n == n)
    same = same and all(stats.meta.get(k) == v for k, v in (dataset or {}).items())
    return same and (stats.features is not None or not keep_features)


def dataset_stats(
    source: str | ImageSource,
    *,
    network: InceptionNetwork,
    num_samples: int | None = None,
    batch_size: int = 64,
    keep_features: bool = False,
    cache: bool = True,
    workers: int = 0,
    progress: bool = False,
    resolution: int | None = None,
) -> FeatureStats:
    """Feature statistics of a folder or shard set, identical on every rank.

    `resolution`: decode shard images at the training resolution exactly as the training reader does
    (a 64x64 model trained from 256x256 shards is scored against 64x64 reals); None: as stored.

    For a local shard set with a known size the result is cached beside its manifest as
    `fid-stats_<sha256[:16]>_299px_<resize>_r<R>_d<data sha[:12]>_n<N>.npz` and reused by later runs and
    ranks; rank 0 alone reads and writes the cache and broadcasts what it found, so ranks never disagree.
    A cached file without raw features does not satisfy a KID request and is recomputed (then rewritten
    with them). The shard writer deletes these files when it rewrites the folder.
    """
    src = source if isinstance(source, ImageSource) else open_source(source)
    rank, _ = rank_world()
    n = src.total if num_samples is None else (num_samples if src.total is None else min(num_samples, src.total))
    dataset = dataset_identity(src, resolution) if rank == 0 else None
    dataset = broadcast_from_rank0(dataset)
    path = _cache_path(src, network, n, dataset) if cache else None

    found: FeatureStats | None = None
    if rank == 0 and path is not None and path.is_file():
        try:
            loaded = FeatureStats.load(path)
        except UsageError as exc:
            log.warning("FID: ignoring unreadable statistics cache %s (%s)", path, exc)
        else:
            if _usable(loaded, network, keep_features, n=n, dataset=dataset):
                found = loaded
    found = broadcast_from_rank0(found)
    if found is not None:
        found.meta["cache"] = str(path)
        return found

    feats = compute_dataset_features(
        src, network=network, num_samples=n, batch_size=batch_size, workers=workers, progress=progress,
        resolution=resolution,
    )
    meta = {**network_meta(network), "source": src.spec, "source_kind": src.kind,
            "image_resolution": resolution if src.kind == "shards" else None, **(dataset or {})}
    stats = FeatureStats.from_features(feats, meta=meta, keep_features=keep_features)
    if path is not None and rank == 0:
        try:
            stats.save(path)
            stats.meta["cache"] = str(path)
        except OSError as exc:  # a read-only data folder is not an error, only a missed reuse
            log.warning("FID: cannot cache reference statistics in %s (%s)", path.parent, exc)
    return stats


def generator_stats(
    sample_fn: SampleFn,
    num_samples: int,
    batch_size: int,
    *,
    network: InceptionNetwork,
    device: str | torch.device | None = None,
    seed: int = 0,
    keep_features: bool = False,
    progress: bool = False,
) -> FeatureStats:
    """`compute_generator_features` reduced to FeatureStats with the network's provenance."""
    feats = compute_generator_features(
        sample_fn, num_samples, batch_size, network=network, device=device, seed=seed, progress=progress
    )
    meta = {**network_meta(network), "source": "generator", "seed": int(seed), "batch_size": int(batch_size)}
    return FeatureStats.from_features(feats, meta=meta, keep_features=keep_features)


def compare_on_rank0(a: FeatureStats, b: FeatureStats, **kwargs: Any) -> dict[str, Any]:
    """`compare_stats` computed once on rank 0 (a 2048^2 sqrtm costs seconds of CPU) and broadcast, so
    every rank gets the same record and can take the same decisions (e.g. keeping a best checkpoint)."""
    rank, _ = rank_world()
    result = compare_stats(a, b, **kwargs) if rank == 0 else None
    return broadcast_from_rank0(result)


def default_workers(device: torch.device) -> int:
    """Decode folder images in worker processes only when the network is not using the CPU itself."""
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))
