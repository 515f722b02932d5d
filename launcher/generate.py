"""`rgan generate` (images from a trained generator) and `rgan export` (the generator alone, as a file).

Both load G the way evaluation does (`rgan_dist.export`: the EMA copy with recalibrated BatchNorm statistics,
eval mode), so what a user sees and ships is what FID was measured on. One image per seed, `seed0007.png`;
the seed alone decides the image (not the batch size or the other seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rgan_dist.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint (ckpt-*.pt, best.pt), a checkpoint or run folder (its newest checkpoint), "
                        "or a generator written by `rgan export`")
    p.add_argument("--out", required=True, help="folder for the PNGs (created)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--num", type=int, help="images for seeds 0..N-1 (default 16)")
    which.add_argument("--seeds", help="seeds, e.g. 0-99 or 3,7,11 or 0-9,20-29 (ranges inclusive)")
    which.add_argument("--interpolate", nargs=2, type=int, metavar=("A", "B"),
                       help="walk the latent from seed A to seed B (slerp) instead: one strip PNG, or a GIF")
    p.add_argument("--steps", type=int, default=8, help="frames of --interpolate (default 8)")
    p.add_argument("--gif", action="store_true", help="--interpolate as an animated GIF instead of a strip PNG")
    p.add_argument("--truncation", type=float, metavar="PSI",
                   help="redraw latent components with |z| > PSI (e.g. 0.7): less variety, more typical images")
    p.add_argument("--grid", action="store_true", help="one grid.png of all seeds instead of one PNG per seed")
    p.add_argument("--batch-size", type=int, default=64, help="generator batch (default 64); never changes images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-ema", action="store_true", help="the raw generator instead of its EMA copy")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint (ckpt-*.pt, best.pt), or a checkpoint or run "
                                                       "folder (its newest checkpoint)")
    p.add_argument("--out", required=True, help="G.safetensors, or G.pt for TorchScript")
    p.add_argument("--format", choices=("safetensors", "torchscript"), help="default: from the --out suffix")
    p.add_argument("--device", default="cpu", help="where BatchNorm statistics are recalibrated (default cpu)")
    p.add_argument("--no-ema", action="store_true", help="the raw generator instead of its EMA copy")


def _device(name: str):
    from rgan_dist.engine.distributed import resolve_device

    return resolve_device(name, option="--device")


def run(args: argparse.Namespace) -> int:
    from rgan_dist import export
    from rgan_dist.samples import save_grid

    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size}: must be >= 1")
    if args.num is not None and args.num < 1:
        raise UsageError(f"--num={args.num}: must be >= 1")
    if args.interpolate is not None and args.steps < 2:
        raise UsageError(f"--steps={args.steps}: an interpolation needs >= 2 frames")
    if args.interpolate is None and args.gif:
        raise UsageError("--gif: only with --interpolate A B")
    seeds = export.parse_seeds(args.seeds) if args.seeds else list(range(args.num or 16))
    if args.interpolate is not None and min(args.interpolate) < 0:
        raise UsageError(f"--interpolate {args.interpolate[0]} {args.interpolate[1]}: seeds must be >= 0")
    export.latent(0, 1, args.truncation)  # checks --truncation before the (slower) load
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={args.out!r} is a file; give a folder")

    trained = export.load_trained(args.checkpoint, device=_device(args.device), use_ema=not args.no_ema)
    z_dim = trained.z_dim
    out.mkdir(parents=True, exist_ok=True)
    if args.interpolate is not None:
        a, b = args.interpolate
        ends = export.latents([a, b], z_dim, args.truncation)
        images = export.generate(trained.module, export.slerp(ends[0], ends[1], args.steps), args.batch_size)
        path = out / f"interp-{a}-{b}.{'gif' if args.gif else 'png'}"
        if args.gif:
            save_gif(images, path)
        else:
            save_grid(images, path, nrow=args.steps)
        written = f"{args.steps} frames from seed {a} to seed {b} in {path}"
    else:
        images = export.generate(trained.module, export.latents(seeds, z_dim, args.truncation), args.batch_size)
        if args.grid:
            path = save_grid(images, out / "grid.png", nrow=export.grid_columns(len(seeds)))
            written = f"a grid of {len(seeds)} images in {path}"
        else:
            for seed, image in zip(seeds, images, strict=True):
                save_png(image, out / f"seed{seed:04d}.png")
            written = f"{len(seeds)} images ({_seed_text(seeds)}) to {out}"
    trunc = f", truncation {args.truncation}" if args.truncation is not None else ""
    print(f"rgan generate: wrote {written} ({export.describe(trained.metadata)}{trunc})", flush=True)
    if trained.metadata.get("eval_g_mode") == "train":
        print("rgan generate: note: this run's FID sampled G in train mode (batch statistics); these images use "
              "eval mode (BatchNorm running statistics), so each depends on its seed alone", flush=True)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from rgan_dist import export

    if export.exported_format(export.resolve_source(args.checkpoint)) is not None:
        raise UsageError(f"--checkpoint={args.checkpoint!r} is already an exported generator; give a training "
                         "checkpoint")
    trained = export.load_trained(args.checkpoint, device=_device(args.device), use_ema=not args.no_ema)
    path = export.export_generator(trained, args.out, args.format)
    print(f"rgan export: wrote {path} ({export.describe(trained.metadata)}); load it with "
          f"`from rgan_dist.export import load_generator; G = load_generator({str(path)!r})`", flush=True)
    return 0


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 1:
        return f"seeds {seeds[0]}-{seeds[-1]}"
    shown = ",".join(map(str, seeds[:8])) + ("..." if len(seeds) > 8 else "")
    return f"seed{'s' if len(seeds) > 1 else ''} {shown}"


def _pil(image):
    from PIL import Image

    from rgan_dist.samples import to_uint8

    x = to_uint8(image).permute(1, 2, 0).numpy()
    return Image.fromarray(x[:, :, 0] if x.shape[2] == 1 else x)  # uint8 [H, W] is L, [H, W, 3] is RGB


def save_png(image, path: Path) -> None:
    """One [C, H, W] image in [-1, 1] as a grayscale (1 channel) or RGB PNG at its own size."""
    _pil(image).save(path)


def save_gif(images, path: Path, duration_ms: int = 120) -> None:
    """A looping GIF, `duration_ms` per image. Pillow stores two identical neighbours as one frame shown twice
    as long, so the walk keeps its timing (steps x duration_ms) even when G maps two steps to the same pixels."""
    frames = [_pil(x) for x in images]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.generate ...`, the same as `rgan generate ...`."""
    from launcher.cli import run_command

    p = argparse.ArgumentParser(prog="rgan generate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_command("rgan generate", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
