"""`rgan eval --checkpoint PATH`: FID/KID of a saved generator against its training data (or `--data`).

Uses the same latents, reference statistics and network as the in-training evaluation, so evaluating
`best.pt` with the run's settings reproduces the FID the run logged. Under `torchrun` every rank
generates and embeds its share of the samples; without a launcher it is one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rgan_dist.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (ckpt-*.pt, best.pt) or checkpoint folder")
    p.add_argument("--num-samples", type=int, help="generated samples (default: the run's eval.num_samples)")
    p.add_argument("--reference-samples", type=int,
                   help="real images in the reference statistics (default: the run's eval.reference_samples, "
                        "0 meaning as many as --num-samples)")
    p.add_argument("--data", help="reference images: shard dir, manifest or brace URL list, or sklearn:digits "
                                  "(default: the run's eval.reference_data, else its data.shards)")
    p.add_argument("--inception", help="Inception TorchScript file (default: the documented resolution order)")
    p.add_argument("--batch-size", type=int, help="generator/Inception batch per rank (default: eval.batch_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw generator instead of its EMA copy")
    p.add_argument("--g-mode", choices=("eval", "train"),
                   help="sample with G in eval mode (running statistics) or train mode (batch statistics, the "
                        "paper's protocol) (default: the run's eval.g_mode)")
    p.add_argument("--no-kid", action="store_true", help="skip KID (it keeps all features in memory)")
    p.add_argument("--seed", type=int, help="latent seed (default: the one in-training evaluation used)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < (2 if name != "--batch-size" else 1):
        raise UsageError(f"{name}={value}: must be >= {2 if name != '--batch-size' else 1}")


def run(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args)
    if result is None:  # not rank 0
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(format_result(result))
    return 0


def format_result(r: dict[str, Any]) -> str:
    from rgan_dist.metrics.fid import kid_spread

    which = "EMA generator" if r["ema"] else "generator"
    lines = [f"checkpoint {r['checkpoint']} (step {r['step']}, {which}, seed {r['seed']})",
             f"FID      {r['fid']:.4f}" + ("  (covariance eps fix-up applied)" if r["fid_fixup"] else "")]
    if r.get("kid") is not None:
        lines.append(f"KID      {r['kid']:.6f}{kid_spread(r, 6)}")
    known = f" ({r['network_known_as']})" if r.get("network_known_as") else ""
    lines += [f"N        {r['n_a']} generated vs {r['n_b']} real images of {r['data']}",
              f"network  {r['network_source']}: {r['network_path']}{known}",
              f"sha256   {r['network_sha256']}",
              f"resize   {r['resize']} to {r['resolution']}x{r['resolution']}",
              f"G mode   {r['g_mode']} (batches of {r['g_batch_size']})",
              f"reals    decoded at {r['data_resolution']}px from {r['image_format']} "
              f"(stored at {r['stored_resolution']}px; data sha256 {r['reference_dataset_sha256']})",
              f"reference statistics {r['reference_path'] or '(not cached)'}"]
    return "\n".join(lines)


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any] | None:
    """The whole command; returns the result on rank 0 and None on the other ranks."""
    from rgan_dist.engine.distributed import start
    from rgan_dist.export import generator_from_state, load_training_checkpoint
    from rgan_dist.metrics.evaluator import EVAL_SEED_OFFSET, evaluate_generator, reference_stats
    from rgan_dist.metrics.inception import load_inception

    for name, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        _positive(name, value)
    if args.reference_samples is not None and args.reference_samples < 0:
        raise UsageError(f"--reference-samples={args.reference_samples}: must be >= 0")
    from rgan_dist.checkpoint import checkpoint_path

    path = checkpoint_path(args.checkpoint, what="--checkpoint")
    state, cfg = load_training_checkpoint(path)
    cfg.run.device = args.device
    e = cfg.eval
    n = args.num_samples or e.num_samples
    n_ref = (args.reference_samples if args.reference_samples is not None else e.reference_samples) or n
    batch = args.batch_size or e.batch_size
    data = args.data or cfg.eval.reference_data or cfg.data.shards
    kid = e.kid and not args.no_kid
    seed = args.seed if args.seed is not None else cfg.train.seed + EVAL_SEED_OFFSET
    progress = not args.no_progress

    # Under torchrun every rank embeds its share of the samples; one process otherwise.
    process = start(cfg.run.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    try:
        m = cfg.model
        G, use_ema = generator_from_state(state, cfg, process.device, use_ema=not args.no_ema)
        net = load_inception(args.inception or e.inception or None, device=process.device)
        ref = reference_stats(data, net, resolution=m.resolution, num_samples=n_ref, batch_size=batch,
                              keep_features=kid, progress=progress)
        result = evaluate_generator(G, net, ref, num_samples=n, z_dim=m.z_dim, seed=seed, batch_size=batch,
                                    kid=kid, progress=progress, g_mode=args.g_mode or e.g_mode, ema=use_ema)
        if process.rank != 0:
            return None
        result.pop("fid_info", None)
        result.update(checkpoint=str(path), step=int(state.get("step", 0)), ema=use_ema, seed=seed, data=data,
                      batch_size=batch, reference_path=ref.meta.get("cache"), network_known_as=net.info.known_as,
                      network_convention=net.info.convention, world_size=process.world_size)
        return result
    finally:
        process.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.evaluate ...`, the same as `rgan eval ...`."""
    from launcher.cli import run_command

    p = argparse.ArgumentParser(prog="rgan eval", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_command("rgan eval", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
