"""Shards checked against their manifest while they are read: sample counts, and sha256 streamed.

Why while reading and not as a pass before training: a second read of every shard doubles the I/O of a
remote data set, whereas hashing the bytes as the tar parser consumes them costs one sha256 update per
read (measured in benchmarks/RESULTS.md) and catches the same lies (a manifest whose counts are 10x off,
zeroed digests, a shard replaced or rotted after it was written).

Which reads check what:
* Only a read that goes through a shard's end gives a verdict: a stream whose range ends at the
  manifest's count goes on past it to the end of the tar (reading members, decoding nothing) to see
  that there are no more samples, and a resampled shard is read whole. Every epoch lays all samples
  of all shards end to end over the streams of all ranks, so each shard's end is read by exactly one
  stream per epoch. Reads start at byte 0 even for a range starting mid-shard (a resume mid-shard, a
  shard split between streams), so the bytes before it are hashed as they are passed over.
* count: samples read through the end must equal the manifest's count (always checked when known).
* sha256 (`verify`): `off`; `first` (default): the first time this reader (one per process: rank or
  DataLoader worker) reads the shard through; `always`: every time. Only bytes are hashed: a sample
  that does not decode is skipped by the reader and changes nothing here.
* A shard that cannot be read to its end (cut short, unreachable) gives no verdict: it is a read
  failure, which `guarded` turns into a warning and a count (the samples the read owed its range are
  skipped samples, like undecodable ones), and the reader goes on.
So every shard a run reads is hashed at least once, by the end of the epoch that read it (the training
reader reads the rest of each stream's range, undecoded, when an epoch's batches are done).
A mismatch is a `DataError`: one line naming the shard, expected vs read; a DataLoader worker hands it
to the main process as an item, so that it is not wrapped in the worker's traceback.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from data_pipeline.errors import DataError
from data_pipeline.images import SAMPLE_IMAGE_EXTS
from data_pipeline.shardset import explain_open_error, open_url
from data_pipeline.tarstream import tar_members

VERIFY_MODES = ("off", "first", "always")
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__): not samples
_PREFIX = 12  # digest characters shown in a mismatch
_MAX_WARNINGS = 5  # per worker; the count keeps going, the log does not flood
log = logging.getLogger("data_pipeline")


@dataclass(frozen=True)
class ShardCheck:
    """What the manifest says about one shard (None: not recorded, so not checked) and the sha256 mode."""

    count: int | None
    sha256: str | None
    verify: str = "first"


class _HashingReader:
    """Passes reads through and hashes them, so the digest costs no second read of the shard."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        """Hash what follows the tar's end-of-archive marker too (padding): the digest is of the file."""
        while self.read(1 << 20):
            pass


def iter_shard_samples(
    url: str, lo: int = 0, hi: int | None = None, *, check: ShardCheck | None = None, verified: set[str] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """(key, image bytes or None) for samples lo <= i < hi of one shard; verified as the module says.

    Samples before `lo` are read past but not decoded. Without a verdict to give, the read stops at `hi`.
    Members are grouped into samples the way webdataset does it (same path up to the first dot of the
    file name). `verified` holds the shards this reader has hashed already (for verify=first).
    """
    from webdataset.tariterators import base_plus_ext

    if hi is not None and hi <= lo:
        return
    known = check.count if check is not None else None
    through = hi is None or (known is not None and hi >= known)  # this read gives the shard's verdict
    hashing = (
        through
        and check is not None
        and bool(check.sha256)
        and (check.verify == "always" or (check.verify == "first" and url not in (verified or ())))
    )
    stop = hi if hi is not None else float("inf")
    index = -1
    key: str | None = None
    files: dict[str, bytes] = {}
    with open_url(url) as raw:
        stream = _HashingReader(raw) if hashing else raw
        for fname, data in tar_members(stream):
            k, ext = base_plus_ext(fname)
            if k is None or _META_RE.match(fname):
                continue
            if k != key:
                if key is not None and lo <= index < stop:
                    yield key, _pick_image(files)
                index += 1
                if index >= stop and not through:
                    return
                key, files = k, {}
            if lo <= index < stop:
                files[ext.lower()] = data
        if key is not None and lo <= index < stop:
            yield key, _pick_image(files)
        if isinstance(stream, _HashingReader):
            stream.drain()
    if check is not None and through:
        _verdict(url, index + 1, stream.sha256.hexdigest() if isinstance(stream, _HashingReader) else None, check)
        if isinstance(stream, _HashingReader) and verified is not None:
            verified.add(url)


@dataclass
class ReadStats:
    skipped: int = 0
    shard_errors: int = 0
    warned: int = 0
    verified: set[str] = field(default_factory=set)  # shards whose sha256 this reader checked (verify=first)
    last_error: str = ""

    def warn(self, msg: str) -> None:
        if self.warned < _MAX_WARNINGS:
            log.warning(msg)
        elif self.warned == _MAX_WARNINGS:
            log.warning("further data warnings from this worker are counted but not logged")
        self.warned += 1


def guarded(
    url: str, lo: int, hi: int | None, stats: ReadStats, check: ShardCheck | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """Samples of one shard; a shard that cannot be opened or is cut short is counted, not fatal.

    The samples it then fails to deliver (known when the shard's count is) are skipped samples, like
    undecodable ones: the `skipped_samples` metric is what the epoch lost. A manifest mismatch
    (`DataError`) is fatal: the data is not what the run was configured with.
    """
    got = 0
    try:
        for sample in iter_shard_samples(url, lo, hi, check=check, verified=stats.verified):
            got += 1
            yield sample
    except DataError:
        raise
    except Exception as exc:  # network error, truncated tar, missing file...
        stats.shard_errors += 1
        # Lost: what this read owed its range (a resampled read, hi None, owes nothing: it only fills in).
        lost = max(0, hi - lo - got) if hi is not None and check is not None and check.count is not None else 0
        stats.skipped += lost
        cause = explain_open_error(url, exc)[0] if got == 0 else f"{type(exc).__name__}: {exc}"
        stats.last_error = f"{url}: {cause}"
        stats.warn(f"shard {url} failed after {got} sample(s) ({cause}); {lost} sample(s) skipped, continuing")


def _verdict(url: str, read: int, digest: str | None, check: ShardCheck) -> None:
    wrong = []
    if check.count is not None and read != check.count:
        wrong.append(f"{read} samples read, manifest says {check.count}")
    if digest is not None and check.sha256 is not None and digest != check.sha256.lower():
        wrong.append(f"sha256 {digest[:_PREFIX]}... read, manifest says {check.sha256[:_PREFIX]}...")
    if wrong:
        raise DataError(
            f"shard {url} does not match its manifest: {'; '.join(wrong)}; rewrite the shard set with `rgan shards` "
            f"(or correct manifest.json)"
        )


def _pick_image(files: dict[str, bytes]) -> bytes | None:
    for ext in SAMPLE_IMAGE_EXTS:
        if ext in files:
            return files[ext]
    return None


def shard_checks(counts: tuple[int, ...] | None, digests: tuple[str | None, ...] | None, n: int,
                 verify: str) -> tuple[ShardCheck, ...]:
    """One check per shard: counts known to the reader (manifest or tar headers), sha256 from the manifest.

    `counts` None means the reader only estimates them (remote shards without a manifest): nothing to check.
    """
    if verify not in VERIFY_MODES:
        raise DataError(f"data verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    if counts is None:
        return tuple(ShardCheck(None, None, verify) for _ in range(n))
    sums = digests if digests is not None and verify != "off" else (None,) * n
    return tuple(ShardCheck(c, d or None, verify) for c, d in zip(counts, sums, strict=True))
