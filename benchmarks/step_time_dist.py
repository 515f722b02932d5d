"""Seconds per outer training step: single process vs DDP(N) vs DeepSpeed(N), same per-rank batch.

Each configuration is a real job (`torchrun --standalone` for the distributed ones, a plain process for
single) that builds the Trainer through the strategy seam, runs a few warm-up steps, then times
`--steps` steps of `Trainer.fit` (its `loop_seconds`: metric all-reduces, NaN-guard all-reduces and the
per-step stop-flag all-reduce included; the final checkpoint excluded). Every process gets
`--threads` threads (default 1), so on a machine with N free cores the distributed runs do N times the
work of the single one in ideally the same time: `ddp/single` is the data-parallel overhead per step,
`deepspeed/ddp` the cost of DeepSpeed's engines over plain DDP. Configurations run in rotation
(single, ddp, deepspeed, single, ...) so machine noise hits all of them; medians are reported.

    python benchmarks/step_time_dist.py [--steps 30] [--repeats 3] [--nproc 2] [--resolution 32]
        [--width 32] [--batch 16] [--zero 0] [--penalty none] [--markdown]

Worker mode (what the driver launches): `--worker --strategy S ...` prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    from rgan_dist.config import load_config
    from rgan_dist.engine import make_strategy
    from rgan_dist.engine.loop import Trainer

    out = tempfile.mkdtemp(prefix="rgan-bench-dist-")
    overrides = [
        "model.arch=dcgan", f"model.resolution={args.resolution}", f"model.width={args.width}", "model.z_dim=128",
        "model.channels=3", "loss.name=rasgan", f"loss.penalty={args.penalty}", f"train.batch_size={args.batch}",
        "train.progress=false", "train.log_every=1000000", "train.sample_every=0", "checkpoint.every=0",
        "tracking.enabled=false", f"run.out_dir={out}", f"run.device={args.device}", f"dist.strategy={args.strategy}",
    ]
    if args.penalty != "none":
        overrides.append("model.d_batch_norm=false")
    if args.strategy == "deepspeed":
        overrides.append(f'dist.deepspeed_config={{"zero_optimization": {{"stage": {args.zero}}}}}')
    cfg = load_config(None, overrides)

    class TimedTrainer(Trainer):
        """Notes the process CPU time when the loop ends (the final checkpoint is fit()'s first save)."""

        def save_checkpoint(self):  # noqa: ANN202
            self.cpu_at_loop_end = getattr(self, "cpu_at_loop_end", None) or time.process_time()
            return super().save_checkpoint()

    s = make_strategy(cfg)
    try:
        cfg.train.steps = args.steps
        trainer = TimedTrainer(cfg, strategy=s)
        for _ in range(args.warmup):
            trainer.train_step()
        trainer.step = 0
        s.barrier()
        cpu0 = time.process_time()
        result = trainer.fit()
        per_step = s.all_gather_object((result.loop_seconds / args.steps,
                                        (trainer.cpu_at_loop_end - cpu0) / args.steps))
        if s.is_main:
            print("RESULT " + json.dumps({"strategy": args.strategy, "world": s.world_size,
                                          "s_per_step": max(w for w, _ in per_step),
                                          "cpu_s_per_step_per_rank": sum(c for _, c in per_step) / len(per_step),
                                          "threads": torch.get_num_threads(), "torch": torch.__version__}),
                  flush=True)
    finally:
        if "trainer" in locals():
            trainer.tracker.close()
        s.close()


def launch(args: argparse.Namespace, strategy: str) -> dict:
    common = ["--worker", "--strategy", strategy, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--resolution", str(args.resolution), "--width", str(args.width),
              "--batch", str(args.batch), "--zero", str(args.zero), "--penalty", args.penalty,
              "--device", args.device]
    script = str(Path(__file__).resolve())
    if strategy == "single":
        cmd = [sys.executable, script, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               script, *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{strategy} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["job_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="single")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="per rank")
    ap.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage")
    ap.add_argument("--penalty", default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategies", default="single,ddp,deepspeed")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table row block")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    strategies = args.strategies.split(",")
    runs: dict[str, list[float]] = {s: [] for s in strategies}
    cpu: dict[str, list[float]] = {s: [] for s in strategies}
    for _ in range(args.repeats):
        for s in strategies:
            r = launch(args, s)
            runs[s].append(r["s_per_step"])
            cpu[s].append(r["cpu_s_per_step_per_rank"])
            print(f"{s:10s} world {r['world']}  {r['s_per_step'] * 1000:8.1f} ms/step  "
                  f"{r['cpu_s_per_step_per_rank'] * 1000:8.1f} CPU ms/step/rank  (job {r['job_seconds']:.0f}s)",
                  flush=True)
    med = {s: statistics.median(v) for s, v in runs.items()}
    mcpu = {s: statistics.median(v) for s, v in cpu.items()}
    print(f"\nDCGAN {args.resolution}x{args.resolution} width {args.width}, batch {args.batch}/rank, penalty "
          f"{args.penalty}, ZeRO-{args.zero}, {args.threads} thread(s)/process, {args.steps} steps x {args.repeats}")
    for s in strategies:
        print(f"{s:10s} median {med[s] * 1000:8.1f} ms/step   runs {[round(x * 1000, 1) for x in runs[s]]}   "
              f"CPU/rank {mcpu[s] * 1000:.1f} ms/step")
    for a, b in (("ddp", "single"), ("deepspeed", "single"), ("deepspeed", "ddp")):
        if a in med and b in med:
            print(f"{a}/{b:10s} wall {med[a] / med[b]:.3f}   CPU per rank {mcpu[a] / mcpu[b]:.3f}")
    if args.markdown:
        base, cbase = med.get("single"), mcpu.get("single")
        print("\n| strategy | ranks | ms/step (median) | runs (ms) | img/s (all ranks) | wall vs single | "
              "CPU ms/step/rank | CPU vs single |")
        print("|---|---|---|---|---|---|---|---|")
        for s in strategies:
            world = 1 if s == "single" else args.nproc
            ips = 2 * args.batch * world / med[s]  # one D batch + one fresh G batch per outer step
            rel = f"{med[s] / base:.3f}" if base else "-"
            crel = f"{mcpu[s] / cbase:.3f}" if cbase else "-"
            print(f"| {s} | {world} | {med[s] * 1000:.1f} | {', '.join(f'{x * 1000:.1f}' for x in runs[s])} | "
                  f"{ips:.0f} | {rel} | {mcpu[s] * 1000:.1f} | {crel} |")


if __name__ == "__main__":
    main()
