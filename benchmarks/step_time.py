"""Milliseconds per training step of our loop vs a minimal plain-PyTorch loop doing the same work, on CPU or CUDA.

Same work: a DCGAN pair, RaSGAN, n_dis = 1, a fresh real batch for the G step, EMA of G, Adam (fused, as ours),
reals drawn from the same in-memory uint8 images and normalised on the device; bf16 is autocast in both; with
`compile` the plain loop torch.compile's its two modules (what a user would write), ours compiles its step
functions (`train.compile`). The plain loop runs D on reals and fakes in two forwards, as most loops do; ours
decides by itself (one concatenated forward for a D without BatchNorm). Ours runs through `Trainer.fit`
(config, strategy seam, NaN guard, metrics every 50 steps, progress bar off); its final checkpoint is not
written. Clocks start and stop after `torch.cuda.synchronize()` on CUDA; wall and process CPU time are both
recorded (the CPU-time ratio is what a shared, busy host disturbs least), and on CUDA the peak of
`torch.cuda.max_memory_allocated()`.

Each case runs in a process of its own (clean CUDA memory peaks, one process group per DDP/DeepSpeed case, a
world of one). Within a case the repeats alternate ours, plain, ours, plain, ... so machine noise hits both,
and the reported ratio is the median of the per-repeat ratios (with their range). Cases with `vs` compare two
of ours (R1 with `loss.penalty_every` against the same D unpenalised) the same way.

    python benchmarks/step_time.py --matrix cpu|gpu [--device cpu|cuda] [--repeats N] [--steps N]
        [--quick] [--budget-s S] [--out benchmarks/results/step_time_<tag>.json]
    python benchmarks/step_time.py --table benchmarks/results/step_time_<tag>.json   # markdown for RESULTS.md

`--quick` shrinks every model to 16x16, width 8, batch 4 and a few steps: the plumbing dry run
(`--device cpu --quick --matrix gpu` runs every kind of case of the GPU matrix on a CPU). The JSON is rewritten
after every case, so a run cut short by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# ---- the matrices -------------------------------------------------------------------------------------

def _case(res: int, width: int, batch: int, precision: str = "fp32", compile: str = "none",
          strategy: str = "single", penalty: str = "none", penalty_every: int = 1, d_bn: bool = True,
          plain: bool = True, vs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"res": res, "width": width, "batch": batch, "precision": precision, "compile": compile,
            "strategy": strategy, "penalty": penalty, "penalty_every": penalty_every, "d_bn": d_bn,
            "plain": plain, "vs": vs}


def _lazy_r1(res: int, width: int, batch: int, precision: str) -> dict[str, Any]:
    """Ours with R1 every 16th D step vs ours unpenalised, same D (no BatchNorm: a penalty wants none)."""
    base = _case(res, width, batch, precision, d_bn=False, plain=False)
    return {**base, "penalty": "r1", "penalty_every": 16, "vs": base}


def matrix(name: str) -> list[dict[str, Any]]:
    """Most informative first: a run cut short by `--budget-s` keeps the cases that matter most."""
    if name == "cpu":
        return [_case(64, 64, 32), _lazy_r1(64, 64, 32, "fp32")]
    if name == "gpu":
        return [
            _case(64, 64, 64, "bf16"), _case(64, 64, 64, "fp32"), _lazy_r1(64, 64, 64, "bf16"),
            _case(64, 64, 64, "bf16", strategy="ddp"), _case(64, 64, 64, "bf16", strategy="deepspeed"),
            _case(64, 64, 256, "bf16"), _case(64, 64, 256, "fp32"),
            _case(256, 32, 32, "bf16"), _case(256, 32, 32, "fp32"),
            # compiling costs a minute or more per case: after the cases that take seconds
            _case(64, 64, 64, "bf16", "default"), _case(64, 64, 64, "bf16", "reduce-overhead"),
            _case(64, 64, 64, "fp32", "default"), _case(64, 64, 64, "fp32", strategy="ddp"),
            _case(64, 64, 64, "fp32", strategy="deepspeed"),
        ]
    raise SystemExit(f"step_time.py: unknown --matrix {name!r}; use cpu or gpu")


def label(c: dict[str, Any]) -> str:
    parts = [f"DCGAN-{c['res']} w{c['width']} b{c['batch']}", c["precision"]]
    if c["compile"] != "none":
        parts.append(f"compile={c['compile']}")
    if not c["d_bn"]:
        parts.append("D without BN")
    if c["penalty"] != "none":
        parts.append(f"{c['penalty']} every {c['penalty_every']}")
    return ", ".join(parts)


# ---- one measurement ----------------------------------------------------------------------------------

def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _config(c: dict[str, Any], device: str, out: str) -> Any:
    from rgan_dist.config import load_config

    overrides = [
        "model.arch=dcgan", f"model.resolution={c['res']}", f"model.width={c['width']}", "model.z_dim=128",
        "model.channels=3", f"model.d_batch_norm={str(c['d_bn']).lower()}", "loss.name=rasgan",
        f"loss.penalty={c['penalty']}", f"loss.penalty_every={c['penalty_every']}", f"train.batch_size={c['batch']}",
        "train.n_dis=1", "train.ema=0.999", f"train.precision={c['precision']}", f"train.compile={c['compile']}",
        "train.progress=false", "train.log_every=50", "train.sample_every=0", "checkpoint.every=0",
        "tracking.enabled=false", "data.workers=0", f"run.out_dir={out}", f"run.device={device}",
        "checkpoint.overwrite=true", f"dist.strategy={c['strategy']}",
    ]
    return load_config(None, overrides)


def ours(c: dict[str, Any], device: str, steps: int, warmup: int) -> dict[str, Any]:
    """One timed `Trainer.fit` of `steps` steps after `warmup` untimed ones; the final checkpoint is skipped."""
    from rgan_dist.engine.loop import Trainer

    class Timed(Trainer):
        def save_checkpoint(self):  # noqa: ANN202 - fit() calls it first thing after its loop: stop the clocks
            _sync(self.strategy.device)
            self.stopped_at = (time.perf_counter(), time.process_time())
            return None

        def save_samples(self):  # noqa: ANN202 - not part of a step
            return None

    cfg = _config(c, device, tempfile.mkdtemp(prefix="rgan-bench-"))
    cfg.train.steps = steps
    trainer = Timed(cfg)
    try:
        dev = trainer.strategy.device
        for _ in range(warmup):  # compiles, cudnn autotuning, allocator warm-up: outside the clocks
            trainer.train_step()
        trainer.step, trainer.d_steps = 0, 0  # lazy penalties then fall on steps 0, k, 2k, ... as in a run
        _sync(dev)
        _reset_peak(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.fit()
        t1, c1 = trainer.stopped_at
        return {"wall": (t1 - t0) / steps, "cpu": (c1 - c0) / steps, "mem_gib": _peak_gib(dev)}
    finally:
        trainer.strategy.close()


def plain(c: dict[str, Any], device: str, steps: int, warmup: int, images: Any) -> dict[str, Any]:
    """The same work in a plain loop (module docstring)."""
    import contextlib

    import torch

    from rgan_dist import losses
    from rgan_dist.models import build_models

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=c["res"], z_dim=128, width=c["width"], channels=3, d_batch_norm=c["d_bn"])
    G, D = G.to(dev), D.to(dev)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    og = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    od = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    mode = c["compile"]
    g, d = (G, D) if mode == "none" else (torch.compile(G, mode=mode), torch.compile(D, mode=mode))
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if c["precision"] == "bf16"
           else contextlib.nullcontext())
    b = c["batch"]
    images = images.to(dev)

    def reals() -> torch.Tensor:
        idx = torch.randint(0, len(images), (b,), device=dev)
        return images[idx].float().div_(127.5).sub_(1)

    def step() -> None:
        real = reals()
        with torch.no_grad(), amp:
            fake = g(torch.randn(b, 128, device=dev))
        with amp:
            loss = losses.d_loss("rasgan", d(real), d(fake))
        loss.backward()
        od.step()
        od.zero_grad(set_to_none=True)
        real = reals()
        D.requires_grad_(False)
        with amp:
            gl = losses.g_loss("rasgan", d(real), d(g(torch.randn(b, 128, device=dev))))
        gl.backward()
        og.step()
        og.zero_grad(set_to_none=True)
        D.requires_grad_(True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(G.parameters()), 0.001)

    for _ in range(warmup):
        step()
    _sync(dev)
    _reset_peak(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(dev)
    t1, c1 = time.perf_counter(), time.process_time()
    return {"wall": (t1 - t0) / steps, "cpu": (c1 - c0) / steps, "mem_gib": _peak_gib(dev)}


def run_case(c: dict[str, Any], device: str, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Interleaved repeats of ours and its reference (plain loop, or ours on `vs`) for one case."""
    import torch

    from rgan_dist.data import load_digits_uint8

    torch.backends.cudnn.benchmark = True
    images = load_digits_uint8(c["res"], 3)
    result: dict[str, Any] = {"ours": [], "ref": [], "ref_kind": "vs" if c["vs"] else ("plain" if c["plain"] else None)}
    for _ in range(repeats):
        result["ours"].append(ours(c, device, steps, warmup))
        if c["vs"]:
            result["ref"].append(ours(c["vs"], device, steps, warmup))
        elif c["plain"]:
            result["ref"].append(plain(c, device, steps, warmup, images))
    return result


# ---- the driver ---------------------------------------------------------------------------------------

def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "commit": commit.strip() + ("+dirty" if dirty else ""), "argv": sys.argv[1:],
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--matrix", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=48, help="timed steps per run (a multiple of 16: lazy R1 fairness)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny models, 4 steps, 1 repeat: the plumbing dry run")
    ap.add_argument("--only", default="", help="comma-separated indices of the matrix's cases to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip the cases left once this many seconds passed")
    ap.add_argument("--case-timeout-s", type=float, default=600)
    ap.add_argument("--out", default="", help="JSON to write (default: benchmarks/results/step_time_<matrix>_<device>"
                    ".json)")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a results file and exit")
    ap.add_argument("--run-case", metavar="JSON", help=argparse.SUPPRESS)  # worker mode: one case, RESULT line
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.run_case:
        sys.path.insert(0, str(ROOT))
        c = json.loads(args.run_case)
        print("RESULT " + json.dumps(run_case(c, args.device, args.steps, args.warmup, args.repeats)), flush=True)
        return
    if args.quick:
        args.steps, args.warmup, args.repeats = 4, 2, 1
    cases = matrix(args.matrix)
    if args.only:
        cases = [cases[int(i)] for i in args.only.split(",")]
    if args.quick:  # every kind of case, tiny
        cases = [{**c, "res": 16, "width": 8, "batch": 4, "vs": c["vs"] and {**c["vs"], "res": 16, "width": 8,
                                                                             "batch": 4}} for c in cases]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"step_time_{args.matrix}_{args.device}"
               f"{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": _meta(args), "cases": []}
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for c in cases:
        entry: dict[str, Any] = {"case": c, "label": label(c)}
        if args.budget_s and time.monotonic() - start > args.budget_s:
            entry["error"] = "skipped: --budget-s spent"
        else:
            cmd = [sys.executable, __file__, "--run-case", json.dumps(c), "--device", args.device,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            t0 = time.monotonic()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout_s)
                lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode == 0 and lines:
                    entry.update(json.loads(lines[-1][len("RESULT "):]))
                else:
                    why = [x for x in (p.stderr + p.stdout).splitlines() if "Error" in x or "error" in x]
                    entry["error"] = f"exit {p.returncode}: {(why or ['no RESULT line'])[-1][:200]}"
                    print(p.stderr[-3000:], file=sys.stderr)
                # what the run printed about compilation (a fallback to eager names the part)
                entry["notes"] = [x[:200] for x in p.stdout.splitlines() if x.startswith("rgan: warning")][:4]
            except subprocess.TimeoutExpired:
                entry["error"] = f"timeout after {args.case_timeout_s:.0f} s"
            entry["seconds"] = round(time.monotonic() - t0, 1)
        report["cases"].append(entry)
        report["meta"]["loadavg_end"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(_row(entry), flush=True)
    print(f"\nwrote {out}")
    print(table(report))


# ---- the table ----------------------------------------------------------------------------------------

def _ms(runs: list[dict[str, Any]], key: str = "wall") -> str:
    xs = [r[key] * 1000 for r in runs]
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def _ratio(entry: dict[str, Any], key: str) -> str:
    rs = [o[key] / r[key] for o, r in zip(entry["ours"], entry["ref"], strict=True) if r[key] > 0]
    if not rs:
        return "-"
    med = statistics.median(rs)
    return f"**{med:.3f}** ({min(rs):.3f}-{max(rs):.3f})" if len(rs) > 1 else f"**{med:.3f}**"


def _mem(runs: list[dict[str, Any]]) -> str:
    m = [r["mem_gib"] for r in runs if r.get("mem_gib") is not None]
    return f"{max(m):.2f}" if m else "-"


def _row(e: dict[str, Any]) -> str:
    c = e["case"]
    head = f"| {e['label']} | {c['strategy']}(1) |" if c["strategy"] != "single" else f"| {e['label']} | single |"
    if e.get("error"):
        return f"{head} {e['error']} | | | | | |"
    ref = e["ref"] or []
    against = "plain loop" if e["ref_kind"] == "plain" else (f"ours, {label(c['vs'])}" if e["ref_kind"] else "-")
    return (f"{head} {_ms(e['ours'])} | {_ms(ref) if ref else '-'} | {against} | {_ratio(e, 'wall') if ref else '-'} | "
            f"{_ratio(e, 'cpu') if ref else '-'} | {_mem(e['ours'])} / {_mem(ref) if ref else '-'} |")


def table(report: dict[str, Any]) -> str:
    """The markdown RESULTS.md shows for a results file: generated, never typed."""
    m = report["meta"]
    where = m.get("gpu") or f"CPU ({m['cpus']} cores, {m['threads']} threads)"
    load = ", ".join(f"{x:.1f}" for x in m.get("loadavg_start", ())) + " -> " + ", ".join(
        f"{x:.1f}" for x in m.get("loadavg_end", ()))
    lines = [
        f"{where}, torch {m['torch']}, commit {m['commit']}, {m['date_utc']} UTC; {m['steps']} timed steps after "
        f"{m['warmup']} warm-up, {m['repeats']} interleaved repeat(s)"
        f"{', QUICK (plumbing only)' if m['quick'] else ''}; "
        f"load average (1, 5, 15 min) {load}.",
        "",
        "| configuration | strategy | ours ms/step, median (range) | reference ms/step | reference | "
        "ours / reference, wall | ours / reference, CPU time | peak GPU GiB ours / ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(e) for e in report["cases"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
