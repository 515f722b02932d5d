"""Get a trained generator out of a run: load it from a checkpoint the way evaluation sees it, write it alone
to a file with its config, load that file back, and turn seeds into latents reproducibly.

What a user gets is the generator FID was measured on: the EMA copy when the run kept one, with BatchNorm
statistics recomputed for the EMA weights exactly as in-training evaluation and `rgan eval` do
(`rgan_dist.ema.recalibrate_for`), used in eval mode. Eval mode is the only one in which an image depends on
its latent alone (in train mode BatchNorm normalises over the batch, so an image would change with the seeds
it is generated beside); runs whose FID protocol sampled in train mode (`eval.g_mode: train`, the paper
presets) still get their images in eval mode here, from the same recalibrated statistics.

An exported file holds G's parameters and buffers (recalibrated BatchNorm statistics included) and, as
metadata, the `model` section, z dim, resolution and where it came from; no optimiser state, no D, and no
pickled code. `load_generator(path)` rebuilds G from `rgan_dist.models` alone (the trainer is never imported).
Training checkpoints are still read with `torch.load(weights_only=True)` (`rgan_dist.checkpoint`).

Latents: seed s gives z = randn(z_dim) from `torch.Generator().manual_seed(s)` on the CPU, then moved to the
device, so the same seed is the same image whatever the batch size, the order of seeds, or the device (up
to float error). Truncation (`psi`): every component with |z_i| > psi is redrawn from the same seed's stream
until none is (the truncation trick of BigGAN, as StyleGAN's `--trunc` alternative without a mean latent);
psi >= ~3 changes almost nothing, smaller psi trades variety for typical-looking images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rgan_dist.errors import UsageError

if TYPE_CHECKING:
    from rgan_dist.config import Config

FORMAT = "rgan-dist-generator/1"
FORMATS = ("safetensors", "torchscript")
SUFFIXES = {".safetensors": "safetensors", ".pt": "torchscript", ".ts": "torchscript"}
_TORCHSCRIPT_META = "rgan.json"  # the TorchScript file's extra file that holds the metadata


@dataclasses.dataclass
class TrainedGenerator:
    """G ready to sample (eval mode, no gradients, on its device) and what it is (`metadata`: str -> str,
    the form a safetensors header stores)."""

    module: nn.Module
    metadata: dict[str, str]

    @property
    def z_dim(self) -> int:
        return int(self.metadata["z_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


# ---------------------------------------------------------------------------------------------- loading


def resolve_source(given: str | Path) -> Path:
    """The file `rgan generate/export --checkpoint` means: an exported generator or a checkpoint file as given,
    the newest checkpoint of a checkpoint folder, or of a run folder's `checkpoints/`."""
    from rgan_dist.checkpoint import checkpoint_path

    path = Path(given).expanduser()
    if path.is_dir() and not any(path.glob("ckpt-*.pt")) and (path / "checkpoints").is_dir():
        path = path / "checkpoints"  # a run folder (run.out_dir)
    return checkpoint_path(str(path), what="--checkpoint", allowed="a checkpoint file, a checkpoint or run folder, "
                                                                   "or an exported .safetensors/.pt generator")


def load_trained(source: str | Path, *, device: str | torch.device = "cpu", use_ema: bool = True) -> TrainedGenerator:
    """The generator in `source` (see `resolve_source`), prepared as evaluation prepares it (module docstring)."""
    path = resolve_source(source)
    if exported_format(path) is not None:
        if not use_ema:
            raise UsageError(f"--no-ema: {path} is an exported generator (it holds one G only); give a checkpoint")
        module = load_generator(path, device=device)
        return TrainedGenerator(module, read_metadata(path))
    return _from_checkpoint(path, torch.device(device), use_ema=use_ema)


def load_training_checkpoint(path: Path) -> tuple[dict[str, Any], Config]:
    """A training checkpoint (`torch.load(weights_only=True)`) and the run's config stored in it."""
    import yaml

    from rgan_dist.checkpoint import load_checkpoint
    from rgan_dist.config import config_from_dict

    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != "rgan-dist/1" or "config" not in state:
        raise UsageError(f"checkpoint {str(path)!r}: not an rgan-dist training checkpoint")
    return state, config_from_dict(yaml.safe_load(state["config"]), where=f"config stored in {path}")


def generator_from_state(state: dict[str, Any], cfg: Config, device: torch.device, *,
                         use_ema: bool = True) -> tuple[nn.Module, bool]:
    """(G, whether it is the EMA copy) of a loaded checkpoint, on `device`, as evaluation sees it: the EMA
    weights when present and wanted, their BatchNorm statistics recomputed for them (the saved ones may be
    the live G's). The one place `rgan eval`, `rgan generate` and `rgan export` get G from a checkpoint."""
    from rgan_dist.ema import recalibrate_for
    from rgan_dist.models import build_models

    G, _ = build_models(cfg.model)
    ema = state.get("ema")
    with_ema = ema is not None and use_ema
    G.load_state_dict(ema["module"] if with_ema else state["model"]["G"])
    G.to(device)
    if with_ema:
        recalibrate_for(G, cfg)
    return G, with_ema


def _from_checkpoint(path: Path, device: torch.device, *, use_ema: bool) -> TrainedGenerator:
    from rgan_dist.ema import BN_SEED_OFFSET, batch_norms

    state, cfg = load_training_checkpoint(path)
    G, with_ema = generator_from_state(state, cfg, device, use_ema=use_ema)
    G.eval().requires_grad_(False)
    bn = "as trained"
    if with_ema and batch_norms(G):
        bn = f"recalibrated for the EMA weights (seed {cfg.train.seed + BN_SEED_OFFSET}, batch {cfg.eval.batch_size})"
    meta = {
        "format": FORMAT,
        "model": json.dumps(dataclasses.asdict(cfg.model), sort_keys=True),
        "z_dim": str(cfg.model.z_dim),
        "resolution": str(cfg.model.resolution),
        "channels": str(cfg.model.channels),
        "ema": str(with_ema).lower(),
        "batch_norm": bn,
        "step": str(int(state.get("step", 0))),
        "run": cfg.run.name,
        "loss": f"{cfg.loss.name} + penalty {cfg.loss.penalty}",
        "source": str(path),
        "input": "z [B, z_dim] float32, z ~ N(0, I)",
        "output": "images [B, channels, resolution, resolution] float32 in [-1, 1]; use G.eval()",
        "eval_g_mode": cfg.eval.g_mode,
    }
    return TrainedGenerator(G, meta)


# ---------------------------------------------------------------------------------------------- export files


def exported_format(path: str | Path) -> str | None:
    """The format of an exported generator file, or None for anything else (a training checkpoint)."""
    if Path(path).suffix.lower() == ".safetensors":
        return "safetensors"
    # `.pt` may be a training checkpoint or a TorchScript export, and `--format torchscript` any name: look inside
    return "torchscript" if _is_torchscript(path) else None


def _is_torchscript(path: str | Path) -> bool:
    """A `.pt` file may be a training checkpoint or a TorchScript export; TorchScript files are zip archives
    holding `constants.pkl`, checkpoints (torch.save) do not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def export_generator(trained: TrainedGenerator, out: str | Path, fmt: str | None = None) -> Path:
    """Write `trained` to `out` as safetensors (parameters + buffers, metadata in the header) or TorchScript
    (a traced module, metadata as its extra file `rgan.json`); the format from `fmt` or the suffix."""
    out = Path(out)
    if fmt is None:
        fmt = SUFFIXES.get(out.suffix.lower())
        if fmt is None:
            raise UsageError(f"--out={str(out)!r}: name it *.safetensors or *.pt, or give --format "
                             f"({', '.join(FORMATS)})")
    elif fmt not in FORMATS:
        raise UsageError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise UsageError(f"--out={str(out)!r} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    G = trained.module
    meta = {**trained.metadata, "file_format": fmt}
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}, str(tmp), metadata=meta)
    else:
        example = torch.zeros(2, trained.z_dim, device=trained.device)
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; the file format still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(G.eval(), example, check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={_TORCHSCRIPT_META: json.dumps(meta)})
    tmp.replace(out)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata an exported generator carries (model section as JSON, z_dim, resolution, source...)."""
    path = Path(path)
    fmt = _check_exported(path)
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        else:
            extra = {_TORCHSCRIPT_META: ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            meta = json.loads(extra[_TORCHSCRIPT_META] or "{}")
    except Exception as e:  # a truncated or foreign file: one line, never a traceback
        raise UsageError(f"{str(path)!r}: not a loadable {fmt} file ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{str(path)!r}: not a generator exported by `rgan export` (no {FORMAT} metadata)")
    return meta


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """G from a file `rgan export` wrote, in eval mode without gradients: `G = load_generator("G.safetensors")`,
    then `G(torch.randn(n, z_dim))` gives [n, C, R, R] images in [-1, 1] (z_dim: `read_metadata(path)`).
    Needs torch, safetensors and `rgan_dist.models`; nothing of the trainer or its optimisers."""
    path = Path(path)
    meta = read_metadata(path)
    if _check_exported(path) == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    from safetensors.torch import load_file

    from rgan_dist.models import build_models

    sizes = json.loads(meta["model"])
    G, _ = build_models(sizes.pop("arch"), **sizes)
    G.load_state_dict(load_file(str(path)))
    return G.to(device).eval().requires_grad_(False)


def _check_exported(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"{str(path)!r}: no such file")
    fmt = exported_format(path)
    if fmt is None:
        raise UsageError(f"{str(path)!r}: not an exported generator (*.safetensors or a TorchScript *.pt)")
    return fmt


# ---------------------------------------------------------------------------------------------- latents


def parse_seeds(text: str) -> list[int]:
    """`0-99`, `3,7,11` or `0-9,20-29` -> seeds in the order given (ranges inclusive, as StyleGAN's --seeds)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise UsageError(f"--seeds={text!r}: range {part!r} ends before it starts; write {hi}-{lo}")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UsageError(f"--seeds={text!r}: {part!r} is not a seed or a range like 0-99") from None
    if any(s < 0 for s in seeds):
        raise UsageError(f"--seeds={text!r}: seeds must be >= 0")
    return seeds


def latent(seed: int, z_dim: int, truncation: float | None = None) -> torch.Tensor:
    """z for one seed, [z_dim] on the CPU (module docstring: the seed alone decides it)."""
    if truncation is not None and not truncation > 0:
        raise UsageError(f"--truncation={truncation}: must be > 0 (e.g. 0.7; omit it for no truncation)")
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(z_dim, generator=gen)
    if truncation is not None:
        out = z.abs() > truncation
        while out.any():  # redraw only the components outside [-psi, psi], from the same seed's stream
            z[out] = torch.randn(int(out.sum()), generator=gen)
            out = z.abs() > truncation
    return z


def latents(seeds: Sequence[int], z_dim: int, truncation: float | None = None) -> torch.Tensor:
    return torch.stack([latent(s, z_dim, truncation) for s in seeds]) if seeds else torch.zeros(0, z_dim)


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` latents from a to b along the great circle: Gaussian latents live near a sphere, and a straight
    line between two of them passes through low-norm z that G rarely saw in training."""
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images [N, C, R, R] in [-1, 1] (float, CPU) for latents z [N, z_dim], in batches of `batch_size`."""
    device = next(iter(G.parameters()), torch.empty(0)).device
    out = [G(z[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(z), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def grid_columns(n: int) -> int:
    return math.ceil(math.sqrt(n))


def describe(meta: dict[str, Any]) -> str:
    which = "EMA generator" if meta.get("ema") == "true" else "generator"
    step = f", step {meta['step']}" if meta.get("step") else ""
    r, c = meta.get("resolution"), meta.get("channels")
    return f"{which}{step}, {r}x{r}x{c}, z {meta.get('z_dim')}"
