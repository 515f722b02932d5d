"""Turning arbitrary image bytes into an RGB square, shared by the shard writer and the reader.

One module owns the pixel policy (mode conversion, transparency, EXIF orientation, fit, resampling)
so that an image written into shards and an image resized on the fly by the reader go through the
same code and look the same.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FITS = ("crop", "pad", "stretch")
FORMATS = ("jpg", "png", "webp")

# Extensions we try to decode; anything else in a source is ignored silently. HEIC/AVIF are listed
# on purpose: if this Pillow cannot read them the user sees them as skipped with a reason instead of
# losing them without a word.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".gif",
        ".webp",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".heic",
        ".heif",
        ".avif",
        ".jp2",
        ".j2k",
    }
)

# Members of a WebDataset sample that can hold the image, in the order the reader looks for them.
SAMPLE_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")

_RESAMPLE = Image.Resampling.LANCZOS
_ORIENTATION_TAG = 0x0112


class BadImage(Exception):
    """An input that cannot become a sample; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Prepared:
    image: Image.Image  # RGB, resolution x resolution
    orig_size: tuple[int, int]  # (width, height) after EXIF orientation, before any resize
    upscaled: bool


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def open_image(data: bytes, *, verify: bool = True) -> Image.Image:
    """Open bytes with PIL, turning every failure into `BadImage` with a short reason.

    `verify()` is run first because it is the only check that reads chunk checksums (a PNG whose
    CRC is wrong decodes "fine" with `load()`); it costs little next to decoding.
    """
    if not data:
        raise BadImage("empty file")
    if verify:
        try:
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
        except UnidentifiedImageError:
            raise BadImage("not an image (format not recognised)") from None
        except Exception as exc:  # PIL raises SyntaxError, OSError, ValueError... for damaged files
            raise BadImage(f"corrupt image ({_why(exc)})") from None
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except Exception as exc:
        raise BadImage(f"corrupt image ({_why(exc)})") from None


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto `background`.

    16-bit and 32-bit integer greyscale are scaled (65535 -> 255); PIL's own convert() would clip
    them and turn most of a 16-bit photo white.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N
        a = np.asarray(im).astype(np.float32)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float32)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        a = np.nan_to_num(a * scale)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def fit_square(
    im: Image.Image, resolution: int, fit: str, background: tuple[int, int, int]
) -> tuple[Image.Image, bool]:
    """Return (R x R RGB image, whether any side had to be enlarged).

    Lanczos is used in both directions: it antialiases when shrinking (the common case), and the
    manifest counts enlargements so a user can see how many inputs were too small.
    """
    w, h = im.size
    r = resolution
    if fit == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        if (w, h) == (r, r):
            return im, False
        return im.resize((r, r), _RESAMPLE, box=(left, top, left + s, top + s)), s < r
    if fit == "stretch":
        if (w, h) == (r, r):
            return im, False
        return im.resize((r, r), _RESAMPLE), w < r or h < r
    if fit == "pad":
        scale = r / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (r, r), background)
        inner = im if (nw, nh) == (w, h) else im.resize((nw, nh), _RESAMPLE)
        canvas.paste(inner, ((r - nw) // 2, (r - nh) // 2))
        return canvas, scale > 1
    raise ValueError(f"unknown fit {fit!r}")


def prepare(
    data: bytes | Image.Image,
    resolution: int,
    *,
    fit: str = "crop",
    background: tuple[int, int, int] = (255, 255, 255),
    verify: bool = True,
) -> Prepared:
    """Decode (bytes or an already open image) into an RGB `resolution`-square.

    Raises `BadImage` for anything that cannot be decoded completely.
    """
    im = data if isinstance(data, Image.Image) else open_image(data, verify=verify)
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1) if "exif" in im.info else 1
        w, h = im.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated GIF/WebP/APNG: the first frame is the image
        if im.format == "JPEG" and min(im.size) >= 4 * resolution:
            # Decode at a reduced DCT scale but keep >= 2x the target for Lanczos to antialias from:
            # several times faster on large photos, visually the same result.
            im.draft(None, (2 * resolution, 2 * resolution))
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        rgb = to_rgb(im, background)
        out, _ = fit_square(rgb, resolution, fit, background)
    except BadImage:
        raise
    except Exception as exc:  # truncated data, decoder errors, bad EXIF, unsupported mode...
        raise BadImage(f"corrupt image ({_why(exc)})") from None
    return Prepared(out, (w, h), _enlarged(w, h, resolution, fit))


def _enlarged(w: int, h: int, r: int, fit: str) -> bool:
    """Whether the fit had to enlarge the original (judged on the full-size image, not a draft)."""
    if fit == "crop":
        return min(w, h) < r
    if fit == "pad":
        return max(w, h) < r
    return w < r or h < r


def encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    """Deterministic encoding (same pixels -> same bytes), so shard checksums are reproducible."""
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 chroma at high quality: GAN training data should not lose colour detail to 4:2:0.
        im.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "png":
        im.save(buf, "PNG", compress_level=6)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def decode_square(data: bytes, resolution: int | None) -> np.ndarray:
    """Reader path: shard bytes -> uint8 HxWx3; resized (centre crop) only if not already R x R.

    No `verify()` here: shards we wrote were verified at write time, and a damaged sample still
    fails in `load()` (the reader skips and counts it).
    """
    im = open_image(data, verify=False)
    if resolution is None:
        im.load()
        if "exif" in im.info and im.getexif().get(_ORIENTATION_TAG, 1) != 1:
            im = ImageOps.exif_transpose(im)
        try:
            return np.asarray(to_rgb(im, (255, 255, 255)))
        except Exception as exc:
            raise BadImage(f"corrupt image ({_why(exc)})") from None
    if im.format in ("JPEG", "PNG", "WEBP") and im.size == (resolution, resolution) and "exif" not in im.info:
        try:
            im.load()
            return np.asarray(to_rgb(im, (255, 255, 255)))
        except Exception as exc:
            raise BadImage(f"corrupt image ({_why(exc)})") from None
    return np.asarray(prepare(im, resolution).image)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
