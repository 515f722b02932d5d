"""Reader peak RSS with 1k vs 20k samples: streaming must not grow with the data set.

    python benchmarks/data_reader_rss.py [--small 1000] [--large 20000] [--resolution 64]

Builds two shard sets (JPEG, shards of 1000 samples) from real-photo crops, then reads one full
epoch of each in a fresh subprocess (`make_batch_iterator`, 2 workers, batch 64) and reports the
peak RSS of the main process and of the largest DataLoader worker (getrusage; workers are reaped
when the iterator closes), plus the main process's growth over its RSS before the reader was made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_common import machine, peak_rss_mib, write_photo_tar


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(shards: str, workers: int, batch: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline, as in a training process)

    from data_pipeline import make_batch_iterator

    before = _current_rss_mib()
    t0 = time.perf_counter()
    with make_batch_iterator(shards, batch_size=batch, rank=0, world_size=1, workers=workers) as it:
        steps = it.batches_per_epoch
        for _ in range(steps):
            next(it)
    seconds = time.perf_counter() - t0
    main_peak, worker_peak = peak_rss_mib()
    return dict(batches=steps, seconds=seconds, rss_before_mib=before, main_peak_mib=main_peak,
                worker_peak_mib=worker_peak, main_growth_mib=main_peak - before)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.workers, args.batch)))
        return

    from data_pipeline import write_shards

    res = args.resolution
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.large):
            src = write_photo_tar(Path(tmp) / f"src{n}.tar", n, (res * 5 // 4, res), seed=n)
            out = Path(tmp) / f"shards{n}"
            m = write_shards([str(src)], out, res, shard_size=1000, workers=2, progress=False)
            proc = subprocess.run(
                [sys.executable, __file__, "--measure", str(out), "--workers", str(args.workers),
                 "--batch", str(args.batch)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[n]["shard_mib"] = sum(s["bytes"] for s in m["shards"]) / 2**20
            print(n, json.dumps(rows[n], default=lambda v: round(v, 1)))
    s, big = rows[args.small], rows[args.large]
    print(f"\nMachine: {machine()}; {res}x{res} JPEG, shards of 1000, {args.workers} workers, batch {args.batch}.\n")
    print("| samples | shard data | epoch time | main peak RSS | main growth | largest worker peak RSS |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(
            f"| {n} | {r['shard_mib']:.0f} MiB | {r['seconds']:.1f} s | {r['main_peak_mib']:.0f} MiB "
            f"| {r['main_growth_mib']:.0f} MiB | {r['worker_peak_mib']:.0f} MiB |"
        )
    print(
        f"\nlarge/small: main peak {big['main_peak_mib'] / s['main_peak_mib']:.3f}, "
        f"worker peak {big['worker_peak_mib'] / s['worker_peak_mib']:.3f}"
    )


if __name__ == "__main__":
    main()
