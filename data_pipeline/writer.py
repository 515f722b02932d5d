"""Image collection -> WebDataset tar shards + manifest.json (the `rgan shards` command).

Determinism is the design constraint: the output (sample order, keys, shard boundaries, bytes, and
so the sha256 in the manifest) depends only on the inputs and the options, never on the worker
count. Workers only decode/resize/encode; the main process consumes their results strictly in input
order and alone decides where a shard ends. Tar headers carry fixed metadata (mtime 0, uid 0) so
that two runs produce identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.images import FITS, FORMATS, BadImage, _why, encode, prepare
from data_pipeline.sources import SHARD_CHANNELS, Item, check_sources, item_label, list_sources, read_item

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_SHARD_SIZE = 5000
DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the finished archive to a multiple of this
_CHUNK = 16  # items per task sent to a worker: amortises IPC without hurting the ordered window
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class EncodeOptions:
    resolution: int
    fmt: str
    quality: int
    fit: str
    background: tuple[int, int, int]


def write_shards(
    sources: Sequence[str],
    out_dir: str | os.PathLike[str],
    resolution: int,
    *,
    fmt: str = "jpg",
    quality: int = 95,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    workers: int = 1,
    fit: str = "crop",
    background: Sequence[int] = (255, 255, 255),
    overwrite: bool = False,
    name: str = "data",
    shuffle: bool = True,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write `out_dir/<name>-NNNNNN.tar` shards and `out_dir/manifest.json`; return the manifest.

    `shuffle` (default on, seeded) permutes the input order before sharding: folders are often
    sorted by class, and a reader that streams shards sequentially would otherwise see long runs of
    one class. Broken inputs are skipped and listed in the manifest; non-image files are ignored.
    Raises `DataError` for bad arguments, an existing non-empty `out_dir` without `overwrite`, or
    when not a single input could be used.
    """
    opts = _check_options(resolution, fmt, quality, fit, background)
    if isinstance(sources, str):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard size must be a positive integer, got {shard_size!r}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise DataError(f"max shard bytes must be a positive integer, got {max_shard_bytes!r}")
    if not _NAME_RE.match(name):
        raise DataError(f"shard name {name!r} must start with a letter or digit and use only A-Z a-z 0-9 _ . -")
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be >= 0 (0 = one per CPU core), got {workers!r}")
    workers = workers or (os.cpu_count() or 1)
    check_sources(sources)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)

    listing = list_sources(sources)
    items = listing.items
    if not items:
        raise DataError(f"no image files found in {', '.join(sources)} ({listing.ignored} non-image files ignored)")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]

    created = not out.exists()
    _clear_old_output(out, name)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, name, shard_size, max_shard_bytes, opts.fmt)
    skipped: list[dict[str, str]] = []
    upscaled = 0
    from tqdm import tqdm

    show = progress if progress is not None else _stderr_is_tty()
    try:
        with tqdm(total=len(items), unit="img", desc="shards", disable=not show) as bar:
            for item, result in zip(items, _ordered_results(items, opts, workers), strict=True):
                bar.update(1)
                if result[0] == "skip":
                    skipped.append({"path": item.display, "reason": result[1]})
                    continue
                _, data, orig_size, was_upscaled = result
                upscaled += was_upscaled
                meta: dict[str, Any] = {
                    "path": item.rel,
                    "source": item.source,
                    "orig_size": list(orig_size),
                    "upscaled": bool(was_upscaled),
                }
                label = item_label(item)
                if label is not None:
                    meta["label"] = label
                writer.add(data, json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        shards = writer.finish()
    except BrokenProcessPool as exc:
        writer.abort()
        raise RuntimeError(
            "a shard-writer worker process died (out of memory, or the calling script cannot be re-imported "
            "by spawned processes, e.g. code piped to `python -`); retry with workers=1 to find out"
        ) from exc
    except BaseException:
        writer.abort()
        raise
    if not shards:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise DataError(f"none of the {len(items)} images in {', '.join(sources)} could be used{first}")

    manifest = {
        "version": MANIFEST_VERSION,
        "name": name,
        "num_samples": sum(s["num_samples"] for s in shards),
        "resolution": opts.resolution,
        "channels": SHARD_CHANNELS,
        "format": opts.fmt,
        "quality": opts.quality,
        "jpeg_subsampling": ("4:4:4" if opts.quality >= 90 else "4:2:0") if opts.fmt == "jpg" else None,
        "fit": opts.fit,
        "background": list(opts.background),
        "shuffle_seed": seed if shuffle else None,
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "sources": sources,
        "upscaled": upscaled,
        "ignored": listing.ignored,
        "shards": shards,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        **wids_shardlist(shards),
    }
    tmp = out / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def wids_shardlist(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The same shards in the form WebDataset's `wids` reads (`wids_version` 1, `shardlist` of url/nsamples,
    plus `filesize`), so `wids.ShardListDataset("DIR/manifest.json")` opens our set as is: the manifest
    itself is the wids descriptor (wids ignores our other keys and resolves the relative URLs against the
    manifest's own location, local or remote)."""
    return {"wids_version": 1,
            "shardlist": [{"url": s["url"], "nsamples": s["num_samples"], "filesize": s["bytes"]} for s in shards]}


def summary_line(manifest: dict[str, Any], out_dir: str | os.PathLike[str]) -> str:
    return (
        f"kept {manifest['num_samples']}, skipped {len(manifest['skipped'])}, ignored {manifest['ignored']}"
        f" (upscaled {manifest['upscaled']}) -> {len(manifest['shards'])} shard(s) in {out_dir}"
    )


def _check_options(resolution: Any, fmt: Any, quality: Any, fit: Any, background: Any) -> EncodeOptions:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 2 <= resolution <= 8192:
        raise DataError(f"resolution must be an integer from 2 to 8192 pixels, got {resolution!r}")
    fmt = {"jpeg": "jpg"}.get(str(fmt).lower(), str(fmt).lower())
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise DataError(f"quality must be an integer from 1 to 100, got {quality!r}")
    if fit not in FITS:
        raise DataError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    try:
        bg = tuple(int(c) for c in background)
    except (TypeError, ValueError):
        bg = ()
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise DataError(f"background must be three values 0..255 (R, G, B), got {background!r}")
    return EncodeOptions(resolution, fmt, quality, fit, bg)  # type: ignore[arg-type]


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it")


# Files that consumers cache beside a shard set and that describe its content (FID reference statistics
# are written as `fid-stats_*.npz`): stale once the shards are rewritten, so the writer removes them.
DERIVED_FILE_RE = re.compile(r"^fid-stats_.*\.npz$")


def _clear_old_output(out: Path, name: str) -> None:
    """--overwrite removes what a shard writer produced (the manifest and its shards) and the files
    derived from those shards (`DERIVED_FILE_RE`: cached statistics of the old images would otherwise be
    taken for the new ones). Anything else a user keeps in the folder (notes) stays.
    """
    if not out.is_dir():
        return
    doomed = {out / MANIFEST, out / (MANIFEST + ".partial")}
    try:
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        for s in old.get("shards", []):
            url = str(s.get("url", ""))
            if url and "/" not in url and "\\" not in url and url not in (".", ".."):
                doomed.add(out / url)
    except (OSError, ValueError, AttributeError):
        pass
    pattern = re.compile(rf"^{re.escape(name)}-\d{{6}}\.tar(\.partial)?$")
    doomed.update(p for p in out.iterdir()
                  if pattern.match(p.name) or p.name.endswith(".tar.partial") or DERIVED_FILE_RE.match(p.name))
    for p in doomed:
        if p.is_file():
            p.unlink()


def _stderr_is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


# ---- the per-image work (runs in worker processes) ----

_worker_opts: EncodeOptions | None = None


def _init_worker(opts: EncodeOptions) -> None:
    global _worker_opts
    _worker_opts = opts


def _process_chunk_in_worker(items: list[Item]) -> list[tuple]:
    assert _worker_opts is not None
    return [_process(item, _worker_opts) for item in items]


def _process(item: Item, opts: EncodeOptions) -> tuple:
    """("ok", encoded bytes, original (w, h), upscaled) or ("skip", reason). Never raises for bad data."""
    try:
        raw = read_item(item, opts.resolution)
    except Exception as exc:  # bad zip CRC, encrypted member, I/O error, vanished file
        return ("skip", f"unreadable ({_why(exc)})")
    try:
        src = Image.fromarray(raw) if isinstance(raw, np.ndarray) else raw  # uint8 [H, W] -> L, [H, W, 3] -> RGB
        prep = prepare(src, opts.resolution, fit=opts.fit, background=opts.background)
        data = encode(prep.image, opts.fmt, opts.quality)
    except BadImage as exc:
        return ("skip", str(exc))
    except Exception as exc:  # an encoder/decoder failure we did not foresee must not end the run
        return ("skip", f"could not convert ({_why(exc)})")
    return ("ok", data, prep.orig_size, prep.upscaled)


def _ordered_results(items: list[Item], opts: EncodeOptions, workers: int) -> Iterator[tuple]:
    """Results in input order; at most a few chunks per worker in flight (bounded memory)."""
    chunks = (items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK))
    if workers <= 1:
        for chunk in chunks:
            for item in chunk:
                yield _process(item, opts)
        return
    # spawn: workers import only PIL/numpy, whatever the parent (torch, CUDA, threads) has loaded.
    ctx = mp.get_context("spawn")
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(opts,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(ex.submit(_process_chunk_in_worker, chunk))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ---- tar writing (main process only) ----


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through, so sha256 costs no second read."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._f.write(b)
        self.sha256.update(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().close()


class _ShardWriter:
    """Rolls over to a new shard before a sample would exceed the count or the byte cap.

    The byte cap is exact (headers, padding and the end-of-archive record included); only a single
    sample larger than the cap gets a shard of its own that exceeds it.
    """

    def __init__(self, out: Path, name: str, shard_size: int, max_bytes: int, ext: str):
        self.out, self.name, self.shard_size, self.max_bytes, self.ext = out, name, shard_size, max_bytes, ext
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self._count = 0  # samples in the open shard
        self._key = 0  # global sample index: the key, unique across the whole set

    def add(self, image: bytes, meta: bytes) -> None:
        need = _member_bytes(len(image)) + _member_bytes(len(meta))
        if self._tar is not None and (
            self._count >= self.shard_size or _final_size(self._file.size + need) > self.max_bytes
        ):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        key = f"{self._key:09d}"  # digits only: no dot can split it, no two samples share it
        self._add_member(f"{key}.{self.ext}", image)
        self._add_member(f"{key}.json", meta)
        self._count += 1
        self._key += 1

    def finish(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._partial().unlink(missing_ok=True)
            self._tar = None

    def _fname(self) -> str:
        return f"{self.name}-{len(self.shards):06d}.tar"

    def _partial(self) -> Path:
        return self.out / (self._fname() + ".partial")

    def _open_shard(self) -> None:
        self._file = _HashingFile(self._partial())
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        fname = self._fname()
        os.replace(self._partial(), self.out / fname)
        self.shards.append(
            {
                "url": fname,
                "num_samples": self._count,
                "sha256": self._file.sha256.hexdigest(),
                "bytes": self._file.size,
            }
        )
        self._tar = None


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _final_size(payload: int) -> int:
    """Archive size once closed: two zero blocks, then padding to a whole record."""
    return -(-(payload + 2 * _BLOCK) // _RECORD) * _RECORD
