"""Does an augmentation leak into G? A leak shows as a *fixed pattern*: the same stroke at the same place in
(nearly) every generated image. The 32x32 small-data runs with augmentation drew one (two vertical strokes
near the right edge in one run, lines along the bottom in another) and the runs without it did not. By eye on
64 samples that is an impression; this puts a number on it over thousands of images.

The number: average the images' luminance pixel by pixel, and take the largest step between two neighbouring
pixels of that average (luminance in [0, 1]). Real images put their content anywhere, so their average is a
smooth blur (steps of a few hundredths); a stroke that G draws at one place in most images survives the
average as a sharp edge. The real images' own score is printed beside the runs as the floor, and the average
images are written as one PNG, so the pattern can be seen, not only counted.

    python benchmarks/fixed_pattern.py --reference SHARDS --run NAME=RUN/checkpoints/ckpt.pt ... \\
        --out fixed_pattern.json [--png means.png]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.modes_by_step import generated  # noqa: E402
from rgan_dist.errors import UsageError  # noqa: E402
from rgan_dist.export import load_trained  # noqa: E402
from rgan_dist.metrics.modes import batched  # noqa: E402

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601


def mean_luminance(chunks: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
    """The pixel-wise mean luminance ([R, R] in [0, 1]) of uint8 [n, R, R, 3] chunks, and the image count."""
    total, n = None, 0
    for c in chunks:
        lum = (c.astype(np.float32) @ LUMA) / 255.0
        total = lum.sum(0) if total is None else total + lum.sum(0)
        n += len(c)
    if total is None:
        raise UsageError("no images to average")
    return total / n, n


def sharpness(mean: np.ndarray) -> dict[str, float]:
    """Steps between neighbouring pixels of the average image: the largest (the score), the 99th percentile
    and the mean."""
    steps = np.concatenate([np.abs(np.diff(mean, axis=0)).ravel(), np.abs(np.diff(mean, axis=1)).ravel()])
    return {"max_step": float(steps.max()), "p99_step": float(np.percentile(steps, 99)),
            "mean_step": float(steps.mean())}


def real_images(spec: str, num: int) -> Iterator[np.ndarray]:
    """Up to `num` images of a shard set, in manifest order, in batches."""
    from data_pipeline.reader import iter_images

    return batched(itertools.islice(iter_images(spec), num))


def write_png(path: Path, means: dict[str, np.ndarray], scale: int = 4) -> None:
    """The average images side by side (grey, x`scale`, in the order given), labelled."""
    from PIL import Image, ImageDraw

    r = next(iter(means.values())).shape[0] * scale
    sheet = Image.new("L", (len(means) * (r + 8), r + 14), 255)
    draw = ImageDraw.Draw(sheet)
    for i, (name, m) in enumerate(means.items()):
        tile = Image.fromarray((m * 255).round().astype(np.uint8)).resize((r, r), Image.NEAREST)
        sheet.paste(tile, (i * (r + 8), 14))
        draw.text((i * (r + 8), 1), name[: r // 6], fill=0)
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="real images to score beside the runs (a shard set)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a trained generator to score (the weights `rgan generate` uses)")
    p.add_argument("--num", type=int, default=2000, help="images per run (and at most of the reference)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to add the records to")
    p.add_argument("--png", type=Path, help="write the average images of this invocation here")
    a = p.parse_args(argv)

    def fail(message: str) -> None:  # one line, no usage block
        p.exit(2, f"{p.prog}: error: {message}\n")

    if a.num < 1:
        fail(f"--num {a.num}: must be >= 1")
    runs = []
    for spec in a.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            fail(f"--run {spec!r}: expected NAME=CHECKPOINT")
        runs.append((name, Path(path)))
    if not runs and not a.reference:
        fail("nothing to score: give --reference and/or --run")
    done: dict[str, Any] = json.loads(a.out.read_text()) if a.out.is_file() else {"records": {}}
    means: dict[str, np.ndarray] = {}
    try:
        if a.reference:
            means["real"], n = mean_luminance(real_images(a.reference, a.num))
            done["records"]["real"] = {"source": a.reference, "images": n, **sharpness(means["real"])}
        for name, path in runs:
            trained = load_trained(path)
            means[name], n = mean_luminance(generated(trained, a.num))
            done["records"][name] = {"checkpoint": str(path), "step": int(trained.metadata["step"]), "images": n,
                                     **sharpness(means[name])}
    except UsageError as e:  # a missing or foreign checkpoint or data set: one line; the records so far are kept
        a.out.write_text(json.dumps(done, indent=1) + "\n")
        fail(str(e))
    a.out.write_text(json.dumps(done, indent=1) + "\n")
    if a.png:
        write_png(a.png, means)
    for name in means:
        rec = done["records"][name]
        print(f"{name:24s} {rec['images']:5d} images  average image: largest step {rec['max_step']:.3f}  "
              f"p99 {rec['p99_step']:.3f}  mean {rec['mean_step']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
