"""The workloads' data, made once (`rgan shards`) and reused by every run and later invocation: Stacked-Digits
drawn with the profile's data seed, the emoji folder, and the small-data subset (a seeded draw of
`SMALL_DATA_COUNT` images of one vendor) with the whole vendor set as its FID reference."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

from benchmarks.ttq.profiles import SMALL_DATA_COUNT, SMALL_DATA_VENDOR, usage_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def image_files(folder: Path) -> list[Path]:
    """The images under `folder` (recursive), sorted by path: the order a draw starts from, whatever the
    file system lists."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def draw_subset(files: list[Path], count: int, seed: int) -> list[Path]:
    """`count` of `files`, drawn without replacement by `seed` (the same seed, the same subset), sorted."""
    if len(files) < count:
        raise ValueError(f"{count} images asked for, only {len(files)} there")
    return sorted(random.Random(seed).sample(sorted(files), count))


def prepare_data(workload: str, args: argparse.Namespace, resolution: int, data_seed: int) -> tuple[str, str | None]:
    """The workload's training shards, and its FID reference shards when they are not the training data."""
    root = args.data_dir
    if workload == "stacked":
        dest = root / f"stacked-digits-r{resolution}-n{args.stacked_count}-s{data_seed}"
        return _shards(dest, ["sklearn:stacked-digits", "--resolution", str(resolution), "--count",
                              str(args.stacked_count), "--seed", str(data_seed), "--format", "png"], workload), None
    src = args.emoji_dir if workload == "emoji" else args.emoji_dir / SMALL_DATA_VENDOR
    if not src.is_dir() or not any(src.iterdir()):
        raise usage_error(f"--emoji-dir {args.emoji_dir}: no images in {src}; fetch them with "
                          f"`bash ../shared/data/emoji.sh {args.emoji_dir}` (never commit them)")
    if workload == "emoji":
        return _shards(root / f"emoji-r{resolution}", [str(src), "--resolution", str(resolution), "--format", "png"],
                       workload), None
    reference = _shards(root / f"emoji-{SMALL_DATA_VENDOR}-r{resolution}",
                        [str(src), "--resolution", str(resolution), "--format", "png"], f"{workload} reference")
    name = f"{SMALL_DATA_VENDOR}-n{SMALL_DATA_COUNT}-s{data_seed}"
    dest = root / f"smalldata-{name}-r{resolution}"
    if not (dest / "manifest.json").is_file():
        try:
            chosen = draw_subset(image_files(src), SMALL_DATA_COUNT, data_seed)
        except ValueError as e:
            raise usage_error(f"small data from {src}: {e}") from None
        links = root / f"smalldata-{name}-files"  # the drawn files, linked: `rgan shards` reads a folder
        links.mkdir(parents=True, exist_ok=True)
        for f in chosen:
            link = links / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(f.resolve())
        for stale in set(image_files(links)) - {links / f.relative_to(src) for f in chosen}:
            stale.unlink()  # an earlier, interrupted draw of another subset: never train on more than the draw
    shards = _shards(dest, [str(root / f"smalldata-{name}-files"), "--resolution", str(resolution), "--format",
                            "png", "--seed", str(data_seed)], workload)
    return shards, reference


def _shards(dest: Path, cmd: list[str], what: str) -> str:
    if (dest / "manifest.json").is_file():
        return str(dest)
    print(f"ttq: making {what} shards in {dest}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "launcher", "shards", *cmd, "--out", str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not (dest / "manifest.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise usage_error(f"rgan shards for {what} failed: {tail[0]}")
    return str(dest)
