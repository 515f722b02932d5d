"""Where writer inputs come from: folders, .zip and .tar archives, the embedded sklearn digits, and
Stacked-Digits (three sklearn digits on the R, G, B channels: 1000 classes, the StackedMNIST protocol).

Enumeration runs in the main process and yields small picklable `Item`s (no pixel data), so the
candidate list stays cheap for millions of files; worker processes fetch the bytes themselves
(a zip member by name, a tar member by byte offset, a file by path).
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.images import is_image_name

DIGITS = "sklearn:digits"
STACKED_DIGITS = "sklearn:stacked-digits"
STACKED_DEFAULT_COUNT = 10_000  # 10 images per mode on average; the set is drawn, not enumerated
STACKED_MODES = 1000
# What the images of each kind of source are. Shard sets hold RGB: the writer converts every input to RGB
# (`images.to_rgb`: greyscale is repeated, alpha composited) and the reader decodes RGB; the manifest
# records it as `channels`. scikit-learn's digits are greyscale; Stacked-Digits put one digit on each of
# R, G and B.
SHARD_CHANNELS = 3
SOURCE_CHANNELS = {DIGITS: 1, STACKED_DIGITS: 3}
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@dataclass(frozen=True)
class Item:
    source: str  # the source argument as the user gave it
    rel: str  # POSIX path inside the source; stored in every sample as "path"
    kind: str  # "file" | "zip" | "tar" | "digits" | "stacked"
    loc: tuple  # how a worker fetches the bytes (see `read_item`)

    @property
    def display(self) -> str:
        """How the manifest names this input: the source joined with the inner path."""
        return f"{self.source.rstrip('/')}/{self.rel}"


@dataclass
class Listing:
    items: list[Item] = field(default_factory=list)
    ignored: int = 0  # files whose extension is not an image (counted, never listed)


def check_sources(sources: list[str]) -> None:
    """Reject unusable source arguments before any output is touched."""
    if not sources:
        raise DataError("no source given: pass one or more folders, .zip or .tar files, or sklearn:digits")
    for src in sources:
        if src == DIGITS or parse_stacked(src) is not None:
            continue
        if src.startswith("sklearn:"):
            raise DataError(f"unknown embedded source {src}: use {DIGITS} or {STACKED_DIGITS}")
        p = Path(src)
        if not p.exists():
            raise DataError(f"source not found: {src} (expected a folder, a .zip, a .tar or {DIGITS})")
        if p.is_dir():
            continue
        low = p.name.lower()
        if low.endswith(_COMPRESSED_TAR):
            raise DataError(
                f"compressed tar source not supported: {src} (decompress it to .tar, or use a .zip or folder)"
            )
        if low.endswith(".zip"):
            if not zipfile.is_zipfile(p):
                raise DataError(f"source {src} is not a readable zip archive")
        elif low.endswith(".tar"):
            if not tarfile.is_tarfile(p):
                raise DataError(f"source {src} is not a readable tar archive")
        else:
            raise DataError(f"unsupported source {src}: expected a folder, a .zip, a .tar or {DIGITS}")


def list_sources(sources: list[str]) -> Listing:
    """All candidate images of all sources, in a deterministic order (sources as given, paths sorted).

    The sources must have passed `check_sources`.
    """
    out = Listing()
    for src in sources:
        if src == DIGITS:
            n = len(_digits_images())
            out.items.extend(Item(src, f"{i:04d}", "digits", (i,)) for i in range(n))
        elif (spec := parse_stacked(src)) is not None:
            picks = stacked_indices(*spec)
            out.items.extend(Item(src, f"{i:06d}", "stacked", tuple(map(int, p))) for i, p in enumerate(picks))
        elif Path(src).is_dir():
            _list_folder(src, out)
        elif src.lower().endswith(".zip"):
            _list_zip(src, out)
        else:
            _list_tar(src, out)
    return out


def _junk(rel: str) -> bool:
    """macOS archive litter (`__MACOSX/`, AppleDouble `._x.jpg`) carries an image extension but no image."""
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._")


def _list_folder(src: str, out: Listing) -> None:
    root = Path(src)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            full = Path(dirpath) / fn
            if not full.is_file():
                continue
            found.append(full.relative_to(root).as_posix())
    for rel in sorted(found):
        if is_image_name(rel) and not _junk(rel):
            out.items.append(Item(src, rel, "file", (str(root / rel),)))
        else:
            out.ignored += 1


def _list_zip(src: str, out: Listing) -> None:
    with zipfile.ZipFile(src) as zf:
        infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
    for info in infos:
        rel = info.filename.lstrip("/")
        if is_image_name(rel) and not _junk(rel):
            out.items.append(Item(src, rel, "zip", (src, info.filename)))
        else:
            out.ignored += 1


def _list_tar(src: str, out: Listing) -> None:
    with tarfile.open(src, "r:") as tf:
        members = [m for m in tf.getmembers() if m.isreg()]
    for m in sorted(members, key=lambda m: m.name):
        rel = m.name.removeprefix("./").lstrip("/")
        if is_image_name(rel) and not _junk(rel):
            out.items.append(Item(src, rel, "tar", (src, m.offset_data, m.size)))
        else:
            out.ignored += 1


_zip_cache: dict[str, zipfile.ZipFile] = {}


def read_item(item: Item, resolution: int) -> bytes | np.ndarray:
    """The raw input of one item: file/archive bytes, a uint8 greyscale 8x8 array for digits, or the
    `resolution`-square uint8 RGB stack for Stacked-Digits (built here, so the resize is `stack_digits`'
    bilinear one and not the writer's Lanczos).

    Raises OSError / zipfile.BadZipFile (bad CRC) / RuntimeError (encrypted) for unreadable members;
    the caller records those as skipped.
    """
    if item.kind == "file":
        with open(item.loc[0], "rb") as f:
            return f.read()
    if item.kind == "zip":
        path, member = item.loc
        zf = _zip_cache.get(path)
        if zf is None:
            zf = _zip_cache[path] = zipfile.ZipFile(path)
        return zf.read(member)
    if item.kind == "tar":
        path, offset, size = item.loc
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"tar member truncated ({len(data)} of {size} bytes)")
        return data
    if item.kind == "digits":
        return _digits_images()[item.loc[0]]
    if item.kind == "stacked":
        images = _digits_images()
        return stack_digits(*(images[i] for i in item.loc), resolution=resolution)
    raise ValueError(f"unknown item kind {item.kind!r}")


_digits: tuple[np.ndarray, np.ndarray] | None = None


def digits_label(index: int) -> int:
    return int(_load_digits()[1][index])


def item_label(item: Item) -> int | None:
    """The class an item carries into its sample's metadata ("label"): the digit for sklearn:digits,
    100 * r + 10 * g + b for Stacked-Digits, None for user images."""
    if item.kind == "digits":
        return digits_label(item.loc[0])
    if item.kind == "stacked":
        r, g, b = (digits_label(i) for i in item.loc)
        return 100 * r + 10 * g + b
    return None


# ---- Stacked-Digits ----


def stacked_source(count: int = STACKED_DEFAULT_COUNT, seed: int = 0) -> str:
    """The canonical source string of a Stacked-Digits set, e.g. `sklearn:stacked-digits?count=10000&seed=0`.

    The draw's parameters live in the string so that the manifest's `sources` says how to rebuild the set.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DataError(f"Stacked-Digits count must be a positive integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"Stacked-Digits seed must be an integer >= 0, got {seed!r}")
    return f"{STACKED_DIGITS}?count={count}&seed={seed}"


def parse_stacked(src: str) -> tuple[int, int] | None:
    """(count, seed) of a Stacked-Digits source (bare name: the defaults, seed 0); None for other sources."""
    name, sep, query = src.partition("?")
    if name != STACKED_DIGITS:
        return None
    params = {"count": str(STACKED_DEFAULT_COUNT), "seed": "0"}
    for part in query.split("&") if sep else ():
        key, _, value = part.partition("=")
        if key not in params:
            raise DataError(f"source {src!r}: unknown parameter {key!r}; write {STACKED_DIGITS}?count=N&seed=S")
        params[key] = value
    try:
        count, seed = int(params["count"]), int(params["seed"])
    except ValueError:
        raise DataError(f"source {src!r}: count and seed must be integers, e.g. {stacked_source(1000, 0)}") from None
    stacked_source(count, seed)  # range checks
    return count, seed


def stacked_indices(count: int, seed: int) -> np.ndarray:
    """[count, 3] indices into sklearn's digits (R, G, B = hundreds, tens, units).

    Each channel's class is drawn uniformly, then a uniform sample of that class: drawing a sample
    uniformly from all 1797 would favour the commoner classes (they hold 174..183 samples each), and the
    1000 modes must be equally likely for the reverse KL against uniform to mean what it says.
    """
    labels = _load_digits()[1]
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 10, size=(count, 3))
    u = rng.random((count, 3))
    out = np.empty((count, 3), dtype=np.int64)
    for c, members in enumerate(by_class):
        hit = classes == c
        out[hit] = members[np.minimum((u[hit] * len(members)).astype(np.int64), len(members) - 1)]
    return out


def stack_digits(r: np.ndarray, g: np.ndarray, b: np.ndarray, *, resolution: int) -> np.ndarray:
    """Three 8x8 uint8 greyscale digits (0..255) -> the [resolution, resolution, 3] uint8 Stacked-Digits image.

    The one definition of the representation (PIL bilinear upscale per channel, then R, G, B =
    hundreds, tens, units): the shard writer and the tests build stacks here, and the `modes` metric's
    classifier inverts exactly this.
    """
    from PIL import Image

    size = (resolution, resolution)
    channels = [np.asarray(Image.fromarray(np.asarray(d, dtype=np.uint8), "L").resize(size, Image.Resampling.BILINEAR))
                for d in (r, g, b)]
    return np.stack(channels, axis=-1)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits as uint8 [N, 8, 8] (0..255, the form every source above uses) and labels [N]."""
    return _load_digits()


def _digits_images() -> np.ndarray:
    return _load_digits()[0]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 real 8x8 handwritten digits, 0..16 scaled to 0..255 greyscale, and labels."""
    global _digits
    if _digits is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        _digits = (images, np.asarray(bunch.target))
    return _digits


def spec_channels(spec: str) -> int:
    """How many channels the images of a training data spec (`data.shards`) really have: 1 for the embedded
    greyscale `sklearn:digits`, 3 for Stacked-Digits and for every shard set (the writer stores RGB).

    Read from the spec alone, without opening anything, so a config is resolved and checked before any
    run folder, process group or MLflow run exists, and a remote manifest is not fetched twice."""
    return SOURCE_CHANNELS.get(str(spec).strip(), SHARD_CHANNELS)
