"""`rgan shards SRC... --out DIR --resolution R`: argument wiring for the launcher.

Arguments that need validation (resolution, format, sizes, colours) are parsed here rather than by
argparse `type=`/`choices=`, so that every bad value becomes one `DataError` line (exit code 2, from
the launcher's one error handler) with the same wording as the writer raises.
"""

from __future__ import annotations

import argparse
import re

from PIL import ImageColor

from data_pipeline.errors import DataError
from data_pipeline.images import FITS, FORMATS
from data_pipeline.sources import STACKED_DEFAULT_COUNT, STACKED_DIGITS, stacked_source
from data_pipeline.writer import DEFAULT_MAX_SHARD_BYTES, DEFAULT_SHARD_SIZE, summary_line, write_shards

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="image folder (recursive), .zip, .tar, sklearn:digits, or sklearn:stacked-digits (three digits on "
        "the R, G, B channels, label 100r+10g+b; see --count); several allowed",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    parser.add_argument("--resolution", required=True, metavar="R", help="output side in pixels (square)")
    parser.add_argument("--format", default="jpg", metavar="FMT", help=f"{'|'.join(FORMATS)} (default jpg)")
    parser.add_argument("--quality", default="95", metavar="Q", help="jpg/webp quality 1..100 (default 95)")
    parser.add_argument(
        "--shard-size",
        default=str(DEFAULT_SHARD_SIZE),
        metavar="N",
        help=f"max samples per shard (default {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument(
        "--max-shard-bytes",
        default=str(DEFAULT_MAX_SHARD_BYTES),
        metavar="SIZE",
        help="max bytes per shard, e.g. 256MiB or 1GB (default 256MiB)",
    )
    parser.add_argument("--workers", default="1", metavar="W", help="encoder processes; 0 = one per core (default 1)")
    parser.add_argument(
        "--fit",
        default="crop",
        metavar="MODE",
        help="crop (centre crop, default) | pad (letterbox on --background) | stretch",
    )
    parser.add_argument(
        "--background",
        default="255,255,255",
        metavar="COLOR",
        help="colour behind transparency and padding: R,G,B or a name/#hex (default white)",
    )
    parser.add_argument("--name", default="data", help="shard file prefix: NAME-000000.tar (default data)")
    parser.add_argument(
        "--count",
        default=None,
        metavar="N",
        help=f"images drawn for sklearn:stacked-digits (default {STACKED_DEFAULT_COUNT})",
    )
    parser.add_argument(
        "--seed", default="0", help="seed of the input shuffle and of the sklearn:stacked-digits draw (default 0)"
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order (sorted paths)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards and manifest of an existing DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_shards(args: argparse.Namespace) -> int:
    fmt = str(args.format).lower()
    if fmt not in (*FORMATS, "jpeg"):
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.fit not in FITS:
        raise DataError(f"--fit must be one of {', '.join(FITS)}, got {args.fit!r}")
    seed = _int(args.seed, "--seed", "an integer")
    manifest = write_shards(
        stacked_sources(args.sources, count=args.count, seed=seed),
        args.out,
        _int(args.resolution, "--resolution", "an integer number of pixels, e.g. 64"),
        fmt=fmt,
        quality=_int(args.quality, "--quality", "an integer from 1 to 100"),
        shard_size=_int(args.shard_size, "--shard-size", "a positive integer"),
        max_shard_bytes=parse_size(args.max_shard_bytes),
        workers=_int(args.workers, "--workers", "an integer >= 0"),
        fit=args.fit,
        background=parse_color(args.background),
        overwrite=args.overwrite,
        name=args.name,
        shuffle=not args.no_shuffle,
        seed=seed,
        progress=not args.no_progress,
    )
    print(summary_line(manifest, args.out))
    return 0


def stacked_sources(sources: list[str], *, count: str | None, seed: int) -> list[str]:
    """A bare `sklearn:stacked-digits` becomes its canonical form with --count and --seed, so the manifest's
    `sources` says how to draw the same set again."""
    if count is not None and STACKED_DIGITS not in sources:
        raise DataError(f"--count applies only to the source {STACKED_DIGITS}")
    n = STACKED_DEFAULT_COUNT if count is None else _int(count, "--count", "a positive integer")
    if n < 1:
        raise DataError(f"--count must be a positive integer, got {count!r}")
    if seed < 0 and STACKED_DIGITS in sources:
        raise DataError(f"--seed must be >= 0 for {STACKED_DIGITS}, got {seed}")
    return [stacked_source(n, seed) if s == STACKED_DIGITS else s for s in sources]


def _int(value: object, flag: str, allowed: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DataError(f"{flag} must be {allowed}, got {value!r}") from None


def parse_size(text: str) -> int:
    """'268435456', '256MiB', '1GB', '500k' -> bytes (K/M/G/T: powers of 1024 with 'i', else of 1000)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise DataError(f"--max-shard-bytes must be a byte count like 268435456, 256MiB or 1GB, got {text!r}")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), (m.group(3) or "").lower()
    base = 1024 if suffix == "ib" or (unit and not suffix) else 1000
    size = int(number * base ** " kmgt".index(unit or " "))
    if size < 1:
        raise DataError(f"--max-shard-bytes must be positive, got {text!r}")
    return size


def parse_color(text: str) -> tuple[int, int, int]:
    parts = str(text).split(",")
    try:
        rgb = tuple(int(p) for p in parts) if len(parts) == 3 else ImageColor.getrgb(str(text).strip())[:3]
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise DataError(f"--background must be R,G,B (0..255), a colour name or #hex, got {text!r}")
    return rgb  # type: ignore[return-value]
