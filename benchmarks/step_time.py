"""Seconds per training step of our loop vs a minimal plain-PyTorch loop doing the same work.

Same work = DCGAN-64 pair, RaSGAN, n_dis = 1, batch 32, Adam, fresh real batch for the G step, EMA of
G, real batches drawn from the same in-memory uint8 tensor and normalised on the device. Ours runs
through `Trainer.fit` (config validation, strategy seam, NaN guard, metric logging every 50 steps,
progress bar off); the final checkpoint/sample write after the loop is not part of a step.
Runs alternate (ours, plain, ours, plain, ...) so machine noise hits both; the median ratio is
reported. Usage:

    python benchmarks/step_time.py [--steps 40] [--repeats 3] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from rgan_dist import losses
from rgan_dist.config import load_config
from rgan_dist.data import load_digits_uint8
from rgan_dist.engine.loop import Trainer
from rgan_dist.models import build_models


def ours(cfg, steps: int) -> float:
    cfg = copy.deepcopy(cfg)
    cfg.train.steps = steps
    trainer = Trainer(cfg)
    for _ in range(3):  # warm-up outside the timed region, like the plain loop
        trainer.train_step()
    trainer.step = 0
    result = trainer.fit()  # loop_seconds excludes the final checkpoint/sample write
    trainer.strategy.close()
    return result.loop_seconds / steps


def plain(cfg, steps: int, images: torch.Tensor) -> float:
    dev = torch.device(cfg.run.device)
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=64, z_dim=128, width=64)
    G, D = G.to(dev), D.to(dev)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    og = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    b = cfg.train.batch_size

    def reals() -> torch.Tensor:
        idx = torch.randint(0, len(images), (b,))
        return images[idx].to(dev).float().div_(127.5).sub_(1)

    def step() -> None:
        real = reals()
        with torch.no_grad():
            fake = G(torch.randn(b, 128, device=dev))
        loss = losses.d_loss("rasgan", D(real), D(fake))
        loss.backward()
        od.step()
        od.zero_grad(set_to_none=True)
        real = reals()
        D.requires_grad_(False)
        gl = losses.g_loss("rasgan", D(real), D(G(torch.randn(b, 128, device=dev))))
        gl.backward()
        og.step()
        og.zero_grad(set_to_none=True)
        D.requires_grad_(True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(G.parameters()), 0.001)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="rgan-bench-")
    cfg = load_config(None, [
        "model.arch=dcgan", "model.resolution=64", "model.width=64", "model.z_dim=128", "loss.name=rasgan",
        "train.batch_size=32", "train.n_dis=1", "train.ema=0.999", "train.progress=false", "train.log_every=50",
        "train.sample_every=0", "checkpoint.every=0", "tracking.enabled=false", f"run.out_dir={out}",
        f"run.device={args.device}", "checkpoint.overwrite=true",  # each repeat trains into `out` afresh
    ])
    images = load_digits_uint8(64, 3)
    o, p = [], []
    for _ in range(args.repeats):
        o.append(ours(cfg, args.steps))
        p.append(plain(cfg, args.steps, images))
    mo, mp = statistics.median(o), statistics.median(p)
    print(f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"ours  s/step: median {mo:.4f}  runs {[round(x, 4) for x in o]}")
    print(f"plain s/step: median {mp:.4f}  runs {[round(x, 4) for x in p]}")
    print(f"ratio ours/plain: {mo / mp:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
