"""Shard writer throughput (images/s) with 1 and 2 worker processes.

    python benchmarks/data_writer_throughput.py [--images 600] [--resolution 256] [--repeats 3]

Input: a folder of 640x480 JPEGs (q90, real-photo crops); output: `write_shards(..., resolution)`
as JPEG q95 (decode, EXIF check, centre crop, Lanczos resize, encode, tar, sha256). Worker start-up
is included (it is part of every real run). Runs rotate between worker counts; best run reported,
as wall-clock images/s and as images per CPU-second (what the speed-up would be with idle cores).
The outputs of the two worker counts are also checked to be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
from pathlib import Path

from data_common import Timer, interleaved, machine, write_photo_folder

from data_pipeline import write_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = write_photo_folder(Path(tmp) / "src", args.images, (640, 480))
        manifests: dict[int, dict] = {}

        def run(workers: int) -> tuple[float, float]:
            out = Path(tmp) / f"out{workers}"
            shutil.rmtree(out, ignore_errors=True)
            cpu0 = _cpu()
            with Timer() as t:
                manifests[workers] = write_shards([str(src)], out, args.resolution, workers=workers, progress=False)
            return args.images / t.seconds, args.images / (_cpu() - cpu0)

        runs = interleaved(args.repeats, w1=lambda: run(1), w2=lambda: run(2))
        assert manifests[1] == manifests[2], "worker count changed the output"
    best = {k: max(r[0] for r in v) for k, v in runs.items()}
    cpu = {k: max(r[1] for r in v) for k, v in runs.items()}
    print(json.dumps(runs, default=lambda v: round(v, 1)))
    print(f"\nMachine: {machine()}; {args.images} JPEGs 640x480 -> {args.resolution}^2 JPEG q95", end="")
    print(f"; best of {args.repeats}.\n")
    print("| workers | images/s | speed-up | images per CPU-second (main + workers) |")
    print("|---|---|---|---|")
    for k, w in (("w1", 1), ("w2", 2)):
        print(f"| {w} | {best[k]:.0f} | {best[k] / best['w1']:.2f} | {cpu[k]:.0f} |")


def _cpu() -> float:
    """CPU seconds of this process plus its reaped children (the pool's workers, once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()
