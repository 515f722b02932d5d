"""Shared set-up for the data pipeline benchmarks: realistic source photos and timing helpers.

Sources are random crops (position, scale, flip, colour gain) of the two real photographs that ship
with scikit-learn (`load_sample_images`: china.jpg, flower.jpg, 427x640). Real photo statistics
matter here: JPEG decode time depends on content, and synthetic noise or flat colour would make the
decode far slower or far faster than on a real data set.
"""

from __future__ import annotations

import io
import os
import resource
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def photo_crops(n: int, size: tuple[int, int], seed: int = 0):
    """Yield n distinct RGB PIL images of `size` (w, h) cut from the sklearn sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        src = photos[i % len(photos)]
        scale = rng.uniform(0.45, 1.0)
        cw, ch = int(src.width * scale), int(src.width * scale * h / w)
        ch = min(ch, src.height)
        cw = int(ch * w / h)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        im = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gain = rng.uniform(0.8, 1.2, size=3)
        arr = np.clip(np.asarray(im, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
        yield Image.fromarray(arr)


def write_photo_folder(folder: Path, n: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(photo_crops(n, size, seed)):
        im.save(folder / f"img_{i:06d}.jpg", "JPEG", quality=quality)
    return folder


def write_photo_tar(path: Path, n: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> Path:
    """Same photos in one uncompressed .tar (a writer source), to avoid n files for big counts."""
    with tarfile.open(path, "w") as tf:
        for i, im in enumerate(photo_crops(n, size, seed)):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            info = tarfile.TarInfo(f"img_{i:06d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
    return path


def interleaved(repeats: int, **methods: Callable[[], float]) -> dict[str, list[float]]:
    """Run each method (returns images/s) `repeats` times in rotation; all runs per method."""
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            runs[name].append(fn())
    return runs


def peak_rss_mib() -> tuple[float, float]:
    """(this process, largest waited-for child) peak RSS in MiB (Linux reports KiB)."""
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )


def machine() -> str:
    return f"{os.cpu_count()} CPU cores (shared), no GPU"


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
