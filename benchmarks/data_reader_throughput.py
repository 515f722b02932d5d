"""Reader throughput (images/s) vs a bare decode loop and vs a file-per-image torch Dataset.

    python benchmarks/data_reader_throughput.py [--n256 2000] [--n512 600] [--repeats 3]
    python benchmarks/data_reader_throughput.py --verify [--epochs 2] [--repeats 5]   # cost of data.verify

For each resolution (256, 512) and process count W (1, 2), on the same JPEG bytes (q95, 4:4:4,
written by `write_shards` from real-photo crops):
- reader: `make_batch_iterator(..., workers=W)`, uint8 [B,3,R,R] batches, steady state (first two
  batches excluded: worker start-up and shuffle-buffer fill);
- bare: W forked processes each decoding its share of the bytes already in memory with PIL
  (`Image.open(...).convert("RGB")` -> numpy): no tar parsing, no batching, no IPC: the ceiling;
- folder: the same JPEGs as one file per image, read by a plain torch Dataset + DataLoader(W workers,
  batch B, default collate).
The three are run in rotation `--repeats` times and each figure is its best run: the machine is
shared with other jobs, and rotating keeps a busy spell from favouring one method.

`--verify` measures instead what checking shards against the manifest costs: the reader with
`verify=off`, `first` and `always` in rotation, over `--epochs` epochs each (from the second epoch on,
`first` hashes nothing), reporting each mode's median and range and its ratio to `off` within each
rotation (median and range), in wall and CPU time; plus sha256's own speed (MB per CPU-second) here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from data_common import Timer, interleaved, machine, write_photo_folder
from PIL import Image

from data_pipeline import make_batch_iterator, write_shards
from data_pipeline.shardset import resolve
from data_pipeline.verify import iter_shard_samples, shard_checks

_BYTES: list[bytes] = []


def _decode_range(bounds: tuple[int, int]) -> tuple[int, float]:
    c0 = time.process_time()
    for b in _BYTES[bounds[0] : bounds[1]]:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    return bounds[1] - bounds[0], time.process_time() - c0


def bare_decode(workers: int) -> tuple[float, float]:
    n = len(_BYTES)
    parts = [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_range, [(0, 1)] * workers)  # start the processes before timing
        with Timer() as t:
            done = pool.map(_decode_range, parts)
    images, cpu = sum(d[0] for d in done), sum(d[1] for d in done)
    return images / t.seconds, images / cpu


def reader(shards: Path, workers: int, batch: int, verify: str = "first", epochs: int = 1) -> tuple[float, float]:
    with make_batch_iterator(
        str(shards), batch_size=batch, rank=0, world_size=1, workers=workers, verify=verify
    ) as it:
        steps = it.batches_per_epoch * epochs
        for _ in range(2 * workers):
            next(it)
        cpu0, main0 = it.worker_cpu_seconds, time.process_time()
        with Timer() as t:
            for _ in range(steps):
                b = next(it)
        cpu = it.worker_cpu_seconds - cpu0 + time.process_time() - main0
        assert b.shape[0] == batch and b.dtype == torch.uint8
    return steps * batch / t.seconds, steps * batch / cpu


class FolderDataset(torch.utils.data.Dataset):
    """The plain baseline; each item also carries its worker's CPU clock, for the CPU-time figure."""

    def __init__(self, folder: Path):
        self.files = sorted(folder.iterdir())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        with Image.open(self.files[i]) as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        return img, time.process_time()


def folder(images: Path, workers: int, batch: int) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(
        FolderDataset(images), batch_size=batch, num_workers=workers, shuffle=True, drop_last=True
    )
    it = enumerate(loader)
    clock: dict[int, float] = {}
    for i, (_, cpu) in itertools.islice(it, 2 * workers):
        clock[i % workers] = float(cpu.max())
    start = dict(clock)
    n = 0
    main0 = time.process_time()
    with Timer() as t:
        for i, (b, cpu) in it:
            n += b.shape[0]
            clock[i % workers] = float(cpu.max())  # in-order loader: batch i came from worker i % W
    used = sum(clock[w] - start[w] for w in clock) + time.process_time() - main0
    del it
    return n / t.seconds, n / used


def prepare(work: Path, resolution: int, n: int) -> tuple[Path, Path]:
    src = write_photo_folder(work / f"src{resolution}", n, (resolution * 5 // 4, resolution), seed=resolution)
    shards = work / f"shards{resolution}"
    write_shards([str(src)], shards, resolution, fmt="jpg", quality=95, shard_size=250, workers=2, progress=False)
    files = work / f"files{resolution}"
    files.mkdir()
    _BYTES.clear()
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    data = tf.extractfile(m).read()
                    _BYTES.append(data)
                    (files / m.name).write_bytes(data)
    return shards, files


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def read_pass_cpu_us(shards: Path, verify: str) -> float:
    """CPU us per sample of reading every shard through, checked as `verify` says, decoding nothing: the
    part of the reader that verification changes, isolated from decoding and from the busy host's wall clock."""
    s = resolve(str(shards))
    n, c0 = 0, time.process_time()
    for url, check in zip(s.urls, shard_checks(s.counts, s.digests, len(s.urls), verify), strict=True):
        n += sum(1 for _ in iter_shard_samples(url, check=check))
    return (time.process_time() - c0) / n * 1e6


def verify_cost(args: argparse.Namespace) -> None:
    """Reader throughput with data.verify off / first / always, in rotation (see the module docstring)."""
    modes = ("off", "first", "always")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res, n in ((256, args.n256), (512, args.n512)):
            shards, _ = prepare(Path(tmp), res, n)
            blob = b"".join(t.read_bytes() for t in sorted(shards.glob("*.tar")))
            c0 = time.process_time()  # CPU time: wall time on a shared host measures the neighbours
            hashlib.sha256(blob).hexdigest()
            sha_mb_s = len(blob) / (time.process_time() - c0) / 1e6
            kib = sum(len(b) for b in _BYTES) / len(_BYTES) / 1024
            passes = interleaved(args.repeats, off=lambda s=shards: read_pass_cpu_us(s, "off"),
                                 always=lambda s=shards: read_pass_cpu_us(s, "always"))
            hash_us = min(passes["always"]) - min(passes["off"])  # CPU minima: the least disturbed runs
            decode_us = min(c / k * 1e6 for k, c in (_decode_range((0, len(_BYTES))) for _ in range(args.repeats)))
            print(json.dumps(dict(resolution=res, read_pass_cpu_us=passes, hash_us_per_img=round(hash_us, 1),
                                  decode_us_per_img=round(decode_us, 1)), default=lambda x: round(x, 1)))
            for w in (1, 2):
                runs = interleaved(args.repeats, **{
                    m: (lambda m=m, s=shards, w=w: reader(s, w, args.batch, verify=m, epochs=args.epochs))
                    for m in modes
                })
                ratio = {m: {k: [r[k] / o[k] for r, o in zip(runs[m], runs["off"], strict=True)] for k in (0, 1)}
                         for m in modes[1:]}
                row = dict(resolution=res, images=n, avg_kib=round(kib, 1), workers=w, epochs=args.epochs,
                           sha256_mb_cpu_s=round(sha_mb_s), read_pass_cpu_us=passes, hash_us_per_img=hash_us,
                           decode_us_per_img=decode_us, runs=runs, ratio=ratio)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}, default=lambda x: round(x, 3)))
    print(f"\nMachine: {machine()}; batch {args.batch}; {args.epochs} epoch(s) per run; {args.repeats} rotations.")
    print("img/s: median (range) per mode. Ratios to verify=off within each rotation: median (range).\n")
    print("Read pass: CPU us/image reading the shards through without decoding, verify off vs always (min of runs);")
    print("hash share = their difference / PIL decode CPU us/image.\n")
    print("| res | sha256 MB/CPU-s | read pass off us/img | read pass always us/img | decode us/img | hash share |")
    print("|---|---|---|---|---|---|")
    for r in rows[::2]:
        print(f"| {r['resolution']} ({r['avg_kib']:.0f} KiB) | {r['sha256_mb_cpu_s']} "
              f"| {min(r['read_pass_cpu_us']['off']):.1f} | {min(r['read_pass_cpu_us']['always']):.1f} "
              f"| {r['decode_us_per_img']:.0f} | {r['hash_us_per_img'] / r['decode_us_per_img']:.1%} |")
    print()
    print("| res | W | sha256 MB/CPU-s | off img/s | first img/s | always img/s | first/off wall | always/off wall "
          "| first/off CPU | always/off CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        med = {m: statistics.median(x[0] for x in r["runs"][m]) for m in modes}
        rg = {m: f"{min(x[0] for x in r['runs'][m]):.0f}-{max(x[0] for x in r['runs'][m]):.0f}" for m in modes}
        print(f"| {r['resolution']} ({r['images']} imgs, {r['avg_kib']:.0f} KiB) | {r['workers']} "
              f"| {r['sha256_mb_cpu_s']} "
              + " ".join(f"| {med[m]:.0f} ({rg[m]})" for m in modes)
              + f" | {_spread(r['ratio']['first'][0])} | {_spread(r['ratio']['always'][0])} "
              f"| {_spread(r['ratio']['first'][1])} | {_spread(r['ratio']['always'][1])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n256", type=int, default=2000)
    ap.add_argument("--n512", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--verify", action="store_true", help="measure data.verify off/first/always instead")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run with --verify")
    args = ap.parse_args()
    if args.verify:
        verify_cost(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res, n in ((256, args.n256), (512, args.n512)):
            shards, files = prepare(Path(tmp), res, n)
            kib = sum(len(b) for b in _BYTES) / len(_BYTES) / 1024
            for w in (1, 2):
                runs = interleaved(
                    args.repeats,
                    reader=lambda: reader(shards, w, args.batch),  # noqa: B023
                    bare=lambda: bare_decode(w),  # noqa: B023
                    folder=lambda: folder(files, w, args.batch),  # noqa: B023
                )
                best = {k: max(x[0] for x in v) for k, v in runs.items()}  # wall images/s
                cpu = {k: max(x[1] for x in v) for k, v in runs.items()}  # images per CPU-second
                row = dict(resolution=res, images=n, avg_kib=round(kib, 1), workers=w, wall=best, cpu=cpu, runs=runs)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}, default=round))
    print(f"\nMachine: {machine()}; batch {args.batch}; best of {args.repeats} rotated runs.")
    print("Wall: images/s. CPU: images per CPU-second of all processes involved (reader: workers + main).\n")
    print("| res | W | reader img/s | bare img/s | folder img/s | reader/bare | reader/folder | CPU reader/bare |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wl, c = r["wall"], r["cpu"]
        print(
            f"| {r['resolution']} ({r['images']} imgs, {r['avg_kib']:.0f} KiB) | {r['workers']} | {wl['reader']:.0f} "
            f"| {wl['bare']:.0f} | {wl['folder']:.0f} | {wl['reader'] / wl['bare']:.2f} "
            f"| {wl['reader'] / wl['folder']:.2f} | {c['reader'] / c['bare']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
