"""Cost of an in-training FID/KID evaluation, as a fraction of training time.

Measured, in one process on one device, with the demo model (DCGAN 32x32, width 32, batch 64, RaSGAN,
the embedded digits) unless overridden:

1. `step_s`: seconds per training step (`Trainer.fit` with evaluation off, after 3 warm-up steps).
2. `eval_s`: seconds of one evaluation as the loop runs it (`FidEvaluator(step, G)`: generate and embed
   N samples with the real TF-Inception network, then FID and KID on rank 0), the median of --repeats
   after one warm-up, with the reference statistics already cached (they are computed once per data
   set, N and network, and reported apart); split into generation+embedding and the FID/KID arithmetic.
3. A direct check: `Trainer.fit` for `--steps` steps with `eval.every = --every` against the same run
   without evaluation; the measured slowdown is compared with what (1) and (2) predict.

The fraction for other `eval.every` values is then eval_s / (every * step_s + eval_s), computed from the
measured times (the script says which numbers are measured and which are computed). Usage:

    python benchmarks/eval_cost.py [--num-samples 128] [--batch-size 32] [--steps 40] [--every 20]
                                   [--repeats 3] [--device cpu|cuda] [--threads N] [override ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rgan_dist.config import load_config
from rgan_dist.engine.loop import Trainer
from rgan_dist.metrics.evaluator import EVAL_SEED_OFFSET, FidEvaluator, sample_fn
from rgan_dist.metrics.features import compare_on_rank0, generator_stats

ROOT = Path(__file__).resolve().parent.parent


def fit_seconds(cfg, evaluator=None) -> tuple[float, Trainer]:
    trainer = Trainer(cfg, evaluator=evaluator)
    for _ in range(3):  # warm-up outside the timed loop
        trainer.train_step()
    trainer.step = 0
    result = trainer.fit()
    trainer.strategy.close()
    return result.loop_seconds, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations after one warm-up (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load_start = os.getloadavg()[0]  # other processes on the machine: the figures are only as quiet as it
    out = Path(tempfile.mkdtemp(prefix="eval_cost-"))
    os.environ.setdefault("RGAN_DATA_CACHE", str(out / "cache"))
    base = load_config(ROOT / "configs" / "demo.yaml", [
        f"run.device={a.device}", f"run.out_dir={out}/run", "train.progress=false", "train.sample_every=0",
        "checkpoint.every=0", "tracking.enabled=false", f"train.steps={a.steps}", "train.log_every=10",
        f"eval.num_samples={a.num_samples}", f"eval.batch_size={a.batch_size}", "eval.every=0", *a.overrides])

    # 1. training alone
    plain_s, trainer = fit_seconds(base)
    step_s = plain_s / a.steps

    # 2. one evaluation, as the loop runs it; the reference statistics first (one-off, cached)
    ev = FidEvaluator(base, device=trainer.strategy.device, progress=False)
    t0 = time.perf_counter()
    ev._setup()
    reference_s = time.perf_counter() - t0
    G = trainer.eval_generator
    ev(0, G)  # warm-up: the first pass through the network pays one-off allocator/oneDNN set-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ev(0, G)
        times.append(time.perf_counter() - t0)
    eval_s = statistics.median(times)
    # its parts: generation + Inception embedding, then the FID/KID arithmetic
    e, m = base.eval, base.model
    G.eval()
    t0 = time.perf_counter()
    gen = generator_stats(sample_fn(G, m.z_dim), e.num_samples, e.batch_size, network=ev.net,
                          device=trainer.strategy.device, seed=base.train.seed + EVAL_SEED_OFFSET, keep_features=e.kid)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compare_on_rank0(gen, ev.reference)
    math_s = time.perf_counter() - t0

    # 3. the direct check: the same fit with evaluations every `every` steps (reference already cached)
    with_eval = copy.deepcopy(base)
    with_eval.eval.every = a.every
    with_eval.run.out_dir = f"{out}/run-eval"
    ev2 = FidEvaluator(with_eval, device=trainer.strategy.device, progress=False)
    ev2.net, ev2.reference = ev.net, ev.reference
    evaluated_s, _ = fit_seconds(with_eval, ev2)
    n_evals = a.steps // a.every
    measured_fraction = (evaluated_s - plain_s) / evaluated_s
    predicted_fraction = n_evals * eval_s / (a.steps * step_s + n_evals * eval_s)

    figures = {
        "device": str(trainer.strategy.device), "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0],
        "model": trainer.model_summary, "batch_size": base.train.batch_size, "num_samples": e.num_samples,
        "eval_batch_size": e.batch_size, "kid": e.kid, "network": ev.net.info.summary(),
        "step_s": step_s, "reference_s": reference_s, "eval_s": eval_s, "eval_s_all": times, "embed_s": embed_s,
        "embed_img_per_s": e.num_samples / embed_s, "fid_kid_math_s": math_s,
        "direct": {"steps": a.steps, "every": a.every, "evals": n_evals, "train_only_s": plain_s,
                   "with_eval_s": evaluated_s, "measured_fraction": measured_fraction,
                   "predicted_fraction": predicted_fraction},
        "computed_fraction": {str(k): eval_s / (k * step_s + eval_s) for k in (500, 1000, 5000)},
    }
    print(json.dumps(figures, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
