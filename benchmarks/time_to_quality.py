"""Time to quality: every loss variant trains for the same compute budget; quality is measured at fixed
points of that budget, over several seeds. The experiment to run before trusting a loss.

Usage (a fresh clone, after `pip install -e .`; emoji need `bash ../shared/data/emoji.sh data/emoji`):

    python benchmarks/time_to_quality.py --profile smoke                 # ~1-2 min, what the test runs
    nohup python benchmarks/time_to_quality.py --profile cpu --out runs/ttq-cpu > ttq-cpu.log 2>&1 &
    python benchmarks/time_to_quality.py --profile gpu --out runs/ttq-gpu
    python benchmarks/time_to_quality.py --out runs/ttq-cpu --report-only   # table + plots from the JSON

Rerunning the same command continues a killed benchmark: finished (workload, variant, seed) runs are kept
in `<out>/results.json` and skipped; an unfinished run starts again from scratch.

**The budget clock.** Every run gets the same compute budget and is judged at the same fractions of it.
- CPU profile (`clock: process_cpu`): the CPU seconds of the run's own process (`time.process_time`), with
  torch fixed to 1 thread and data decoded in that process (`data.workers=0`). On a shared machine wall
  time depends on whatever else runs; one thread's CPU time does not, and equals the wall time the run
  would take alone on one core. Runs go in separate processes, `--parallel` at a time (2 on a 2-core box).
- GPU profile (`clock: wall`): wall seconds, `torch.cuda.synchronize()` before each clock read, so queued
  kernels are paid for by the step that queued them. Run one process per GPU (`--parallel 1` on one GPU);
  runs sharing a GPU slow each other down and their wall clocks say so.
- Evaluation (metric, sample grid) is excluded from the budget: the clock is read around each
  `Trainer.train_step()` only. Wall seconds (training only, and in all) are recorded beside it.
The clock is named in the JSON (`clock`) and in the table header.

**What runs.** Each run is the project's own `Trainer` (config `configs/benchmarks/time_to_quality.yaml`
+ workload + profile + variant + seed overrides, through `rgan_dist.config.load_config`): the benchmark
calls `trainer.train_step()` until the next budget point, then `trainer.evaluate()` (the evaluator the
config asks for) and `trainer.save_samples()`. No second training loop.

**Variants** (`--variants`, keys or labels): the paper's two optimizer setups, as in `configs/paper/`:
- no penalty: setup 1 of Table 1, lr 2e-4, Adam betas (0.5, 0.999), n_D = 1, BatchNorm in D (DCGAN).
- WGAN-GP (n_D = 5), RSGAN-GP, RaSGAN-GP (n_D = 1): setup 2 of Table 1, lr 1e-4, betas (0.5, 0.9),
  penalty weight 10, no BatchNorm in D (a per-sample gradient penalty is ill-defined through batch
  statistics).
- RpGAN + R1 + R2 (R3GAN's objective, with our DCGAN, not R3GAN's network): setup-1 optimizer, no
  BatchNorm in D, gamma = 0.1 (R1 and R2 each gamma/2 E||grad||^2). R3GAN tunes gamma per data set;
  0.1 is our untuned choice for 32x32 images, not a value taken from its paper.

**Workloads**: `stacked` (Stacked-Digits 32x32, 1000 modes, metric `modes` and `modes_kl`; shards made
once with `rgan shards sklearn:stacked-digits`, the same images for every seed) and `emoji` (real emoji,
32x32 on CPU, 64x64 on GPU, FID + KID; shards made once from `--emoji-dir`). FID reference statistics are
computed once, before the runs.

**Output** in `--out`: `results.json` (every point of every run, machine, torch, configs, clock; one run
appended as it finishes), `results.md` (the section that goes into benchmarks/RESULTS.md: per-seed table,
per-variant mean and min..max over seeds, time to target), `time_to_quality_<workload>.png` (metric vs
budget seconds, mean with a min..max band per variant), `runs/` (each run's samples and metrics.jsonl),
`logs/` (each run's output). MLflow: one parent run per benchmark (kept across resumed invocations), a
nested child run per variant/seed, metrics logged with step = budget seconds.

Time to target is the budget spent at the first evaluated point that meets the target, so its resolution
is the spacing of the points; a target of `final:VARIANT` is that variant's mean final value (e.g.
`--target-fid final:wgan-gp` asks "when does each variant reach WGAN-GP's final FID?").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "benchmarks" / "time_to_quality.yaml"
FORMAT = "rgan-time-to-quality/1"
CLOCKS = ("process_cpu", "wall")

# --------------------------------------------------------------------------------------------- variants

SETUP_1 = ("train.lr_g=2e-4", "train.lr_d=2e-4", "train.betas=[0.5, 0.999]", "train.n_dis=1")
SETUP_2_GP = ("train.lr_g=1e-4", "train.lr_d=1e-4", "train.betas=[0.5, 0.9]", "loss.penalty=wgan-gp",
              "loss.penalty_weight=10", "model.d_batch_norm=false")
R3GAN_GAMMA = 0.1


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    overrides: tuple[str, ...]


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("sgan", "SGAN", ("loss.name=sgan", "loss.penalty=none", *SETUP_1)),
    Variant("rsgan", "RSGAN", ("loss.name=rsgan", "loss.penalty=none", *SETUP_1)),
    Variant("rasgan", "RaSGAN", ("loss.name=rasgan", "loss.penalty=none", *SETUP_1)),
    Variant("lsgan", "LSGAN", ("loss.name=lsgan", "loss.penalty=none", *SETUP_1)),
    Variant("ralsgan", "RaLSGAN", ("loss.name=ralsgan", "loss.penalty=none", *SETUP_1)),
    Variant("hinge", "HingeGAN", ("loss.name=hinge", "loss.penalty=none", *SETUP_1)),
    Variant("rahinge", "RaHingeGAN", ("loss.name=rahinge", "loss.penalty=none", *SETUP_1)),
    Variant("wgan-gp", "WGAN-GP", ("loss.name=wgan", *SETUP_2_GP, "train.n_dis=5")),
    Variant("rsgan-gp", "RSGAN-GP", ("loss.name=rsgan", *SETUP_2_GP, "train.n_dis=1")),
    Variant("rasgan-gp", "RaSGAN-GP", ("loss.name=rasgan", *SETUP_2_GP, "train.n_dis=1")),
    Variant("rpgan-r1r2", "RpGAN+R1+R2", ("loss.name=rsgan", "loss.penalty=r1+r2",
                                          f"loss.penalty_weight={R3GAN_GAMMA}", "model.d_batch_norm=false",
                                          *SETUP_1)),
)}


# -------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    metric: str             # the headline value of every point
    secondary: str          # shown beside it at the final point
    higher_is_better: bool
    metric_label: str


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("stacked", "Stacked-Digits", "modes", "modes_kl", True, "modes covered (of 1000)"),
    Workload("emoji", "Emoji", "fid", "kid", False, "FID"),
)}
METRIC_OVERRIDES = {"stacked": ("eval.metrics=[modes]",), "emoji": ("eval.metrics=[fid, kid]",)}


@dataclass(frozen=True)
class WorkloadProfile:
    budget_s: float
    fractions: tuple[float, ...]
    variants: tuple[str, ...]
    resolution: int
    eval_samples: int


@dataclass(frozen=True)
class Profile:
    """Budgets, evaluation points, sample counts and model size; every value can be overridden by a flag."""

    clock: str
    device: str
    threads: int            # torch threads per run (0: torch's default)
    parallel: int
    seeds: tuple[int, ...]
    width: int
    batch_size: int
    stacked_count: int      # Stacked-Digits training images
    eval_batch: int         # generator/Inception batch of an evaluation (values do not depend on it: G in eval mode)
    workloads: dict[str, WorkloadProfile]


ALL = tuple(VARIANTS)
PROFILES: dict[str, Profile] = {
    # The test's profile: a few seconds of training per run, small N; shows the machinery, not a result.
    "smoke": Profile(clock="process_cpu", device="cpu", threads=1, parallel=2, seeds=(0, 1), width=16,
                     batch_size=32, stacked_count=2000, eval_batch=50, workloads={
                         "stacked": WorkloadProfile(6.0, (0.5, 1.0), ("rsgan", "rasgan-gp"), 32, 2000),
                         "emoji": WorkloadProfile(6.0, (1.0,), ("rsgan", "rasgan-gp"), 32, 64)}),
    # The 2-core CPU box, ~60 min of wall time with --parallel 2 on a quiet machine. Measured there (1 thread,
    # width 32, batch 64, 32x32, data decoded in the run): ~0.10 CPU s per G step for the n_D = 1 losses without
    # penalty, ~0.47 for WGAN-GP (n_D = 5); a `modes` value of 26k samples ~12 s; FID of N generated samples
    # ~N / 8 s (the TF-Inception network embeds ~8 img/s on one thread); ~8 s to start a run. So per stacked run
    # 150 + 4 x 12 + 8 ~ 206 s, per emoji run 120 + 130 + 8 ~ 258 s: 18 x 206 + 12 x 258 ~ 6800 run-seconds,
    # ~57 min on 2 cores, plus ~4 min once for shards and the FID reference statistics. FID only at the end.
    "cpu": Profile(clock="process_cpu", device="cpu", threads=1, parallel=2, seeds=(0, 1, 2), width=32,
                   batch_size=64, stacked_count=20_000, eval_batch=50, workloads={
                       "stacked": WorkloadProfile(150.0, (0.25, 0.5, 0.75, 1.0),
                                                  ("sgan", "rsgan", "rasgan", "wgan-gp", "rasgan-gp", "rpgan-r1r2"),
                                                  32, 26_000),
                       "emoji": WorkloadProfile(120.0, (1.0,), ("sgan", "rasgan", "wgan-gp", "rasgan-gp"), 32,
                                                1000)}),
    # One GPU: every variant, emoji at 64x64, FID of 10k samples at several points. 11 variants x 3 seeds x
    # (300 s + 600 s) of training is ~8.3 h plus evaluation; select variants/seeds to fit what you have.
    "gpu": Profile(clock="wall", device="cuda", threads=0, parallel=1, seeds=(0, 1, 2), width=64,
                   batch_size=64, stacked_count=50_000, eval_batch=500, workloads={
                       "stacked": WorkloadProfile(300.0, (0.1, 0.25, 0.5, 0.75, 1.0), ALL, 32, 26_000),
                       "emoji": WorkloadProfile(600.0, (0.1, 0.25, 0.5, 0.75, 1.0), ALL, 64, 10_000)}),
}


def usage_error(message: str) -> SystemExit:
    """One line on stderr and exit status 2: what a bad flag gets, never a traceback."""
    print(f"time_to_quality: error: {message}", file=sys.stderr)
    return SystemExit(2)


# ----------------------------------------------------------------------------------- the benchmark logic


def budget_points(budget_s: float, fractions: Sequence[float]) -> list[float]:
    """Budget seconds at which a run is evaluated: `fractions` of `budget_s`, increasing, ending at the budget
    itself (1.0 is added when missing: every run is judged at its full budget)."""
    if not budget_s > 0 or not math.isfinite(budget_s):
        raise ValueError(f"budget must be a positive number of seconds, got {budget_s}")
    fr = sorted(set(float(f) for f in fractions))
    if not fr or fr[0] <= 0 or fr[-1] > 1:
        raise ValueError(f"points must be fractions in (0, 1], got {list(fractions)}")
    if fr[-1] != 1.0:
        fr.append(1.0)
    return [f * budget_s for f in fr]


def train_until(step: Callable[[], Any], clock: Callable[[], float], spent: float, target: float) -> tuple[float, int]:
    """Call `step` until `spent` (clock seconds) reaches `target`; returns (spent, steps taken). Only the steps
    are timed; the last step may overshoot the target by less than one step, and the record keeps the
    actual spent value beside the nominal point."""
    n = 0
    while spent < target:
        t0 = clock()
        step()
        spent += clock() - t0
        n += 1
    return spent, n


def meets(value: float | None, target: float, higher_is_better: bool) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher_is_better else value <= target


def time_to_target(points: Sequence[dict[str, Any]], key: str, target: float, higher_is_better: bool
                   ) -> float | None:
    """Budget seconds spent at the first evaluated point whose `key` meets `target`; None if none does."""
    for p in points:
        if meets((p.get("metrics") or {}).get(key), target, higher_is_better):
            return float(p["spent_s"])
    return None


def spread(values: Iterable[float | None]) -> tuple[float, float, float, int] | None:
    """(mean, min, max, n) of the finite values, None when there are none: the per-variant summary of seeds."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    return statistics.fmean(xs), min(xs), max(xs), len(xs)


def value_at(run: dict[str, Any], fraction: float, key: str) -> float | None:
    for p in run.get("points", []):
        if math.isclose(p["fraction"], fraction):
            v = (p.get("metrics") or {}).get(key)
            return None if v is None else float(v)
    return None


def resolve_target(spec: str | None, runs: Sequence[dict[str, Any]], key: str) -> tuple[float, str] | None:
    """A target given as a number, or `final:VARIANT` (that variant's mean value at its final point in these
    runs); returns (value, description) or None when there is no target or the variant has no value."""
    if spec is None or spec == "":
        return None
    if spec.startswith("final:"):
        name = variant_key(spec[len("final:"):])
        finals = [value_at(r, 1.0, key) for r in runs if r["variant"] == name]
        s = spread(finals)
        if s is None:
            return None
        return s[0], f"{VARIANTS[name].label}'s mean final value ({fmt_value(key, s[0])})"
    return float(spec), fmt_value(key, float(spec))


def variant_key(name: str) -> str:
    """The key of a variant given by key or label, case-insensitively; ValueError names the choices."""
    wanted = name.strip().lower()
    for v in VARIANTS.values():
        if wanted in (v.key, v.label.lower()):
            return v.key
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def check_target(spec: str | None) -> None:
    if spec is None or spec == "":
        return
    if spec.startswith("final:"):
        variant_key(spec[len("final:"):])
        return
    try:
        float(spec)
    except ValueError:
        raise ValueError(f"target {spec!r}: a number or final:VARIANT") from None


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class RunSpec:
    """One (workload, variant, seed) run: everything its process needs, and the settings that make two
    records of it comparable (`settings`, checked on resume)."""

    workload: str
    variant: str
    seed: int
    overrides: list[str]
    budgets: list[float]
    fractions: list[float]
    clock: str
    threads: int
    out_dir: str
    parent_run_id: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.workload, self.variant, self.seed)

    @property
    def name(self) -> str:
        return f"{self.workload}-{self.variant}-seed{self.seed}"

    def settings(self) -> dict[str, Any]:
        """What must match for a stored record to count as this run (paths and tracking excluded)."""
        keep = [o for o in self.overrides if not o.startswith(("run.", "tracking.", "data.shards="))]
        return {"budgets": [round(b, 6) for b in self.budgets], "clock": self.clock, "threads": self.threads,
                "overrides": keep}


def plan_runs(args: argparse.Namespace, data: dict[str, str]) -> list[RunSpec]:
    """Seed-major order (seed 0 of every variant first), so a partial benchmark already compares variants."""
    out: list[RunSpec] = []
    for wname in args.workloads:
        wp = args.workload_profiles[wname]
        budgets = budget_points(wp.budget_s, wp.fractions)
        fractions = [b / wp.budget_s for b in budgets]
        for seed in args.seeds:
            for vkey in wp.variants:
                overrides = [
                    f"data.shards={data[wname]}", f"model.resolution={wp.resolution}", f"model.width={args.width}",
                    f"train.batch_size={args.batch_size}", f"run.device={args.device}",
                    f"eval.batch_size={args.eval_batch}",
                    *METRIC_OVERRIDES[wname], *eval_sample_overrides(wname, wp.eval_samples),
                    *VARIANTS[vkey].overrides, f"train.seed={seed}", *args.set,
                    f"run.name=ttq-{wname}-{vkey}-seed{seed}",
                    f"run.out_dir={args.out / 'runs' / wname / vkey / f'seed{seed}'}",
                ]
                out.append(RunSpec(workload=wname, variant=vkey, seed=seed, overrides=overrides, budgets=budgets,
                                   fractions=fractions, clock=args.clock, threads=args.threads,
                                   out_dir=str(args.out / "runs" / wname / vkey / f"seed{seed}")))
    return out


def eval_sample_overrides(workload: str, n: int) -> tuple[str, ...]:
    """N of the workload's metric: FID/KID of N generated vs N real images; modes of N generated stacks."""
    if workload == "emoji":
        return (f"eval.num_samples={n}", f"eval.reference_samples={n}")
    return (f"eval.modes_samples={n}",)


# ------------------------------------------------------------------------------------------------- a run


class BudgetStepTracker:
    """The run's tracker as the Trainer sees it, with every metric logged at step = budget seconds of the
    current point (the x-axis every variant shares) instead of the generator step (which differs by variant:
    n_D = 5 makes fewer G steps per second); the generator step is logged as `gen_step`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.budget_step = 0

    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None:
        self.inner.log_metrics({**metrics, "gen_step": float(step)}, self.budget_step, context)

    def log_image(self, path: Any, key: str, step: int) -> None:  # sample grids on the same x-axis
        self.inner.log_image(path, key, self.budget_step)

    def __getattr__(self, name: str) -> Any:  # log_params, log_artifact, set_tags, close, ...
        return getattr(self.inner, name)


def make_clock(kind: str, device: str) -> Callable[[], float]:
    """The budget clock of the module docstring."""
    if kind == "process_cpu":
        return time.process_time
    if device.startswith("cuda"):
        import torch

        def wall() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return wall
    return time.perf_counter


def run_one(spec: RunSpec, tracking_uri: str | None) -> dict[str, Any]:
    """Train one variant/seed to its budget through the project's Trainer; the record of every point."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
        with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
            torch.set_num_interop_threads(spec.threads)
    from rgan_dist.config import load_config
    from rgan_dist.engine import make_strategy
    from rgan_dist.engine.loop import Trainer, TrainingDiverged
    from rgan_dist.tracking import make_tracker, run_tags

    overrides = list(spec.overrides)
    if tracking_uri:
        overrides.append(f"tracking.mlflow_uri={tracking_uri}")
    cfg = load_config(CONFIG, overrides)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # an unfinished earlier attempt: a run folder has one run
    strategy = make_strategy(cfg)
    wl, variant = WORKLOADS[spec.workload], VARIANTS[spec.variant]
    extra = {"rgan.benchmark": "time_to_quality", "rgan.ttq.workload": spec.workload,
             "rgan.ttq.variant": variant.label, "rgan.ttq.seed": spec.seed, "rgan.ttq.clock": spec.clock,
             "mlflow.source.name": "benchmarks/time_to_quality.py"}
    if spec.parent_run_id:
        extra["mlflow.parentRunId"] = spec.parent_run_id
    tracker = BudgetStepTracker(make_tracker(cfg, True, tags=run_tags(
        cfg, strategy=strategy.name, world_size=1, device=strategy.device, extra=extra)))
    status, outcome, error = "FAILED", "error", ""
    points: list[dict[str, Any]] = []
    clock = make_clock(spec.clock, str(strategy.device))
    wall_start = time.perf_counter()
    train_wall = spent = 0.0
    try:
        trainer = Trainer(cfg, strategy=strategy, tracker=tracker)  # type: ignore[arg-type]
        tracker.set_tags({"rgan.model": trainer.model_summary})
        last: dict[str, Any] = {}

        def step() -> None:
            nonlocal last
            last = trainer.train_step()

        try:
            for fraction, budget in zip(spec.fractions, spec.budgets, strict=True):
                w0 = time.perf_counter()
                spent, _ = train_until(step, clock, spent, budget)
                train_wall += time.perf_counter() - w0
                tracker.budget_step = int(round(budget))
                e0 = time.perf_counter()
                metrics = trainer.evaluate()
                trainer.save_samples()
                eval_s = time.perf_counter() - e0
                losses = {k: float(v) for k, v in last.items() if k in ("d_loss", "g_loss", "penalty")}
                point = {"fraction": fraction, "budget_s": budget, "spent_s": spent, "step": trainer.step,
                         "train_wall_s": train_wall, "wall_s": time.perf_counter() - wall_start, "eval_s": eval_s,
                         "metrics": {k: float(v) for k, v in metrics.items()}, "losses": losses}
                points.append(point)
                tracker.log_metrics({"budget_s": budget, "spent_s": spent, "train_wall_s": train_wall,
                                     "eval_wall_s": eval_s, **losses}, trainer.step)
                shown = metrics.get(wl.metric)
                print(f"ttq: {spec.name}: {budget:.0f} s budget, step {trainer.step}, {wl.metric} "
                      f"{fmt_value(wl.metric, shown)} (eval {eval_s:.1f} s)", flush=True)
            status, outcome = "FINISHED", "completed"
        except TrainingDiverged as e:
            status, outcome, error = "FINISHED", "diverged", str(e)
            print(f"ttq: {spec.name}: diverged: {e}", flush=True)
        summary = trainer.model_summary
    finally:
        tracker.set_tags({"rgan.ttq.outcome": outcome})
        tracker.close(status)
        strategy.close()
    return {"workload": spec.workload, "variant": spec.variant, "label": variant.label, "seed": spec.seed,
            "outcome": outcome, "error": error, "points": points, "settings": spec.settings(),
            "overrides": spec.overrides, "config": cfg.flat(), "model": summary,
            "mlflow_run_id": str(getattr(tracker.inner, "run_id", "") or ""),
            "wall_s": time.perf_counter() - wall_start, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def worker_main(spec_path: str) -> int:
    """`--_run SPEC.json`: one run in this (fresh) process; its record goes to SPEC.result.json."""
    raw = json.loads(Path(spec_path).read_text())
    spec = RunSpec(**raw["spec"])
    record = run_one(spec, raw.get("tracking_uri"))
    out = Path(spec_path).with_suffix(".result.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str) + "\n")
    tmp.replace(out)
    return 0


# ------------------------------------------------------------------------------------- results and resume


class Results:
    """`<out>/results.json`: header (benchmark, machine, invocations) and one record per finished run,
    rewritten atomically after each run so a kill never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": FORMAT, "invocations": [], "runs": []}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError as e:
                raise usage_error(f"{path}: not readable JSON ({e}); move it away to start afresh") from None
            if self.data.get("format") != FORMAT:
                raise usage_error(f"{path}: not a time_to_quality results file (format {self.data.get('format')!r})")

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    def finished(self, spec: RunSpec) -> dict[str, Any] | None:
        """The stored record of `spec`, if any; a record made with other settings is an error, so two
        budgets never end up in one table."""
        for r in self.runs:
            if (r["workload"], r["variant"], r["seed"]) == spec.key:
                if r.get("settings") != spec.settings():
                    raise usage_error(f"{self.path} holds {spec.name} made with other settings "
                                      f"({_settings_diff(r.get('settings') or {}, spec.settings())}); use another "
                                      f"--out or the same flags")
                return r
        return None

    def add(self, record: dict[str, Any]) -> None:
        self.runs.append(record)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def _settings_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k == "overrides":
                x, y = set(a.get(k) or []), set(b.get(k) or [])
                return f"stored {sorted(x - y)} vs now {sorted(y - x)}"
            return f"{k}: stored {a.get(k)} vs now {b.get(k)}"
    return "?"


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads_default": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# -------------------------------------------------------------------------------------------- the report


def fmt_value(key: str, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if key == "modes":
        return f"{v:.0f}"
    if key in ("kid", "kid_std"):
        return f"{v:.4f}"
    if key == "modes_kl":
        return f"{v:.2f}"
    return f"{v:.1f}"


def fmt_spread(key: str, s: tuple[float, float, float, int] | None, total: int) -> str:
    if s is None:
        return "-"
    mean, lo, hi, n = s
    text = f"{fmt_value(key, mean)} ({fmt_value(key, lo)}..{fmt_value(key, hi)})"
    return text if n == total else f"{text} [{n}/{total}]"


def _secs(s: float | None) -> str:
    """Seconds as a table shows them: whole seconds, one decimal below 10 s (the smoke profile's budgets)."""
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def workload_section(name: str, runs: list[dict[str, Any]], target: str | None, plot: str | None) -> str:
    """One workload's tables (per seed; per variant mean and min..max over seeds) in Markdown."""
    wl = WORKLOADS[name]
    runs = sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    first = runs[0]
    budgets = first["settings"]["budgets"]
    fractions = [b / budgets[-1] for b in budgets]
    cfg = first.get("config", {})
    tgt = resolve_target(target, runs, wl.metric)
    res = cfg.get("model.resolution")
    lines = [f"### {wl.title} {res}x{res}: {wl.metric_label} vs training budget", ""]
    n_eval = cfg.get("eval.modes_samples" if wl.metric == "modes" else "eval.num_samples")
    if tgt:
        target_text = f"Target: {wl.metric} {'>=' if wl.higher_is_better else '<='} {tgt[1]}."
    else:
        target_text = f"Target {target}: no such runs here." if target else "No target given."
    lines.append(f"Budget {_secs(budgets[-1])} per run ({_clock_words(first['settings']['clock'])}); evaluated at "
                 f"{', '.join(_secs(b) for b in budgets)}; N = {n_eval} generated samples per evaluation; "
                 f"{cfg.get('model.arch')} width {cfg.get('model.width')}, batch {cfg.get('train.batch_size')}. "
                 + target_text)
    lines.append("")
    head = ["variant", "seed", *[f"{wl.metric} @ {_secs(b)}" for b in budgets], f"{wl.secondary} @ end",
            "G steps", "time to target"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        pts = r["points"]
        ttt = time_to_target(pts, wl.metric, tgt[0], wl.higher_is_better) if tgt else None
        cells = [r["label"], str(r["seed"]), *[fmt_value(wl.metric, value_at(r, f, wl.metric)) for f in fractions],
                 fmt_value(wl.secondary, value_at(r, 1.0, wl.secondary)), str(pts[-1]["step"]) if pts else "-",
                 ("not reached" if ttt is None else _secs(ttt)) if tgt else "-"]
        if r["outcome"] != "completed":
            cells[-1] += f" ({r['outcome']})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per variant: mean (min..max) over seeds; [n/k] where only n of k runs have a value.", ""]
    head = ["variant", "runs", *[f"{wl.metric} @ {_secs(b)}" for b in budgets], f"{wl.secondary} @ end",
            "time to target (reached)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vkey in VARIANTS:
        vr = [r for r in runs if r["variant"] == vkey]
        if not vr:
            continue
        k = len(vr)
        cells = [VARIANTS[vkey].label, str(k),
                 *[fmt_spread(wl.metric, spread(value_at(r, f, wl.metric) for r in vr), k) for f in fractions],
                 fmt_spread(wl.secondary, spread(value_at(r, 1.0, wl.secondary) for r in vr), k)]
        if tgt:
            times = [time_to_target(r["points"], wl.metric, tgt[0], wl.higher_is_better) for r in vr]
            s = spread(times)
            reached = 0 if s is None else s[3]
            cells.append(f"{reached}/{k}" + ("" if s is None else
                                              f": {_secs(s[0])} ({_secs(s[1])}..{_secs(s[2])})"))
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![{wl.title}: {wl.metric} vs budget seconds]({plot})"]
    return "\n".join(lines) + "\n"


def _clock_words(clock: str) -> str:
    return {"process_cpu": "CPU seconds of the run's own process, 1 torch thread; evaluation excluded",
            "wall": "wall seconds, CUDA synchronised at each clock read; evaluation excluded"}.get(clock, clock)


def markdown_report(data: dict[str, Any], targets: dict[str, str | None], plots: dict[str, str]) -> str:
    """The whole section for benchmarks/RESULTS.md: what ran where, then one part per workload."""
    inv = data.get("invocations") or [{}]
    first = inv[0]
    m = first.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')} ({m.get('cpu_count')} cores)"
    loads = ", ".join(f"{i.get('machine', {}).get('loadavg', ['?'])[0]:.1f}" for i in inv
                      if isinstance(i.get("machine", {}).get("loadavg", [None])[0], float))
    lines = ["## Time to quality: loss variants at equal compute budget", "",
             f"`{first.get('command', 'python benchmarks/time_to_quality.py')}` "
             f"({len(inv)} invocation{'s' if len(inv) != 1 else ''}, {first.get('started', '?')}): {where}, "
             f"torch {m.get('torch')}, Python {m.get('python')}"
             + (f"; 1-minute load average at the start of each invocation: {loads}" if loads else "") + ".", "",
             "Every variant trains for the same budget of the clock below and is judged at the same budget points "
             "(script docstring: `benchmarks/time_to_quality.py`). GAN results vary widely between seeds: a "
             "difference smaller than the min..max spread over seeds is no difference.", ""]
    for name in WORKLOADS:
        runs = [r for r in data["runs"] if r["workload"] == name]
        if runs:
            lines.append(workload_section(name, runs, targets.get(name), plots.get(name)))
    return "\n".join(lines)


def plot_workload(name: str, runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Metric vs budget seconds, one line per variant: mean over seeds with a min..max band."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    wl = WORKLOADS[name]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for vkey in VARIANTS:
        vr = [r for r in runs if r["variant"] == vkey]
        if not vr:
            continue
        budgets = vr[0]["settings"]["budgets"]
        xs, mean, lo, hi = [], [], [], []
        for b in budgets:
            s = spread(value_at(r, b / budgets[-1], wl.metric) for r in vr)
            if s is not None:
                xs.append(b)
                mean.append(s[0])
                lo.append(s[1])
                hi.append(s[2])
        if not xs:
            continue
        line, = ax.plot(xs, mean, marker="o", label=f"{VARIANTS[vkey].label} (n={len(vr)})")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    clock = runs[0]["settings"]["clock"]
    ax.set_xlabel("training budget, seconds (" + ("process CPU time, 1 thread" if clock == "process_cpu"
                                                   else "wall clock") + ")")
    ax.set_ylabel(wl.metric_label + (" (higher is better)" if wl.higher_is_better else " (lower is better)"))
    res = runs[0].get("config", {}).get("model.resolution")
    ax.set_title(f"{wl.title} {res}x{res}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, data: dict[str, Any], targets: dict[str, str | None]) -> list[Path]:
    """results.md and one PNG per workload, rebuilt from the JSON alone (also by --report-only)."""
    files, plots = [], {}
    for name in WORKLOADS:
        runs = [r for r in data["runs"] if r["workload"] == name]
        if runs:
            png = plot_workload(name, runs, out / f"time_to_quality_{name}.png")
            if png is not None:
                plots[name] = png.name
                files.append(png)
    md = out / "results.md"
    md.write_text(markdown_report(data, targets, plots))
    return [md, *files]


# ---------------------------------------------------------------------------------------- data and MLflow


def prepare_data(workload: str, args: argparse.Namespace, resolution: int) -> str:
    """The workload's shard folder, made once (`rgan shards`) and reused by every run and later invocation."""
    root = args.data_dir
    if workload == "stacked":
        dest = root / f"stacked-digits-r{resolution}-n{args.stacked_count}-s0"
        cmd = ["sklearn:stacked-digits", "--resolution", str(resolution), "--count", str(args.stacked_count),
               "--seed", "0", "--format", "png"]
    else:
        src = args.emoji_dir
        if not src.is_dir() or not any(src.iterdir()):
            raise usage_error(f"--emoji-dir {src}: no images there; fetch them with "
                              f"`bash ../shared/data/emoji.sh {src}` (never commit them)")
        dest = root / f"emoji-r{resolution}"
        cmd = [str(src), "--resolution", str(resolution), "--format", "png"]
    if (dest / "manifest.json").is_file():
        return str(dest)
    print(f"ttq: making {workload} shards in {dest}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "launcher", "shards", *cmd, "--out", str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not (dest / "manifest.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise usage_error(f"rgan shards for {workload} failed: {tail[0]}")
    return str(dest)


def warm_reference(spec: RunSpec) -> None:
    """Compute the workload's FID reference statistics once, before parallel runs would each do it (and race
    on the cache file): the very call the runs' evaluator makes, so they find it cached."""
    from rgan_dist.config import load_config
    from rgan_dist.metrics.evaluator import reference_stats
    from rgan_dist.metrics.inception import load_inception

    if spec.workload != "emoji":
        return
    cfg = load_config(CONFIG, spec.overrides)
    t0 = time.perf_counter()
    net = load_inception(cfg.eval.inception or None, device="cuda" if cfg.run.device == "cuda" else "cpu")
    e = cfg.eval
    stats = reference_stats(cfg.data.shards, net, resolution=cfg.model.resolution,
                            num_samples=e.reference_samples or e.num_samples, batch_size=e.batch_size,
                            keep_features=e.kid)
    print(f"ttq: FID reference statistics of {stats.n} real images ready ({time.perf_counter() - t0:.0f} s)",
          flush=True)


class ParentRun:
    """The benchmark's MLflow run, reused by a resumed invocation while it is active in the same store; any
    MLflow failure prints one warning and the benchmark goes on without it."""

    def __init__(self, results: Results, uri: str, artifacts: str | None, experiment: str,
                 params: dict[str, Any]) -> None:
        self.run_id: str | None = None
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            from rgan_dist.tracking import bound_http_retries, experiment_id, git_state, package_versions

            bound_http_retries()
            self.client = MlflowClient(tracking_uri=uri)
            exp = experiment_id(self.client, experiment, artifacts)
            previous = (results.data.get("mlflow") or {})
            if previous.get("tracking_uri") == uri and previous.get("parent_run_id"):
                with contextlib.suppress(Exception):
                    run = self.client.get_run(previous["parent_run_id"])
                    if run.info.lifecycle_stage == "active":
                        self.run_id = run.info.run_id
                        self.client.update_run(self.run_id, status="RUNNING")
            if self.run_id is None:
                tags = {"rgan.benchmark": "time_to_quality", "mlflow.source.name": "benchmarks/time_to_quality.py",
                        "mlflow.source.type": "JOB", **git_state(),
                        **{f"version.{k}": v for k, v in package_versions().items()}}
                self.run_id = self.client.create_run(exp, run_name=f"time-to-quality-{params['profile']}",
                                                     tags=tags).info.run_id
                self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                                      synchronous=True)
            self.experiment_id = exp
            results.data["mlflow"] = {"tracking_uri": uri, "parent_run_id": self.run_id, "experiment": experiment}
            print(f"ttq: MLflow parent run {self.run_id} in experiment {experiment!r} ({uri})", flush=True)
        except Exception as e:  # the benchmark must not depend on the tracking store
            print(f"ttq: warning: MLflow parent run unavailable ({type(e).__name__}: {e}); runs are not nested",
                  file=sys.stderr, flush=True)
            self.run_id = None

    def finish(self, files: list[Path], status: str) -> None:
        if self.run_id is None:
            return
        try:
            children = self.client.search_runs([self.experiment_id],
                                               filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
            for child in children:  # a run whose process was killed never closed its MLflow run
                if child.info.status == "RUNNING":
                    self.client.set_terminated(child.info.run_id, "KILLED")
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            print(f"ttq: warning: could not finish the MLflow parent run ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the scheduler


def run_all(specs: list[RunSpec], results: Results, args: argparse.Namespace, tracking_uri: str | None) -> int:
    """Run `specs`, `args.parallel` at a time, each in its own process (its own clock, its own torch state);
    a finished run is appended to the results at once. Returns the number of runs that failed."""
    pending = list(specs)
    running: dict[int, tuple[RunSpec, subprocess.Popen[bytes], Path, Any]] = {}
    failed = 0
    gpus = _visible_gpus(args.device)
    logs, specs_dir = args.out / "logs", args.out / "specs"
    logs.mkdir(parents=True, exist_ok=True)
    specs_dir.mkdir(parents=True, exist_ok=True)
    try:
        while pending or running:
            for slot in range(args.parallel):
                if slot in running or not pending:
                    continue
                spec = pending.pop(0)
                spec_path = specs_dir / f"{spec.name}.json"
                spec_path.with_suffix(".result.json").unlink(missing_ok=True)
                spec_path.write_text(json.dumps({"spec": dataclasses.asdict(spec), "tracking_uri": tracking_uri}))
                env = dict(os.environ)
                if spec.threads:
                    env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                log = open(logs / f"{spec.name}.log", "a")  # noqa: SIM115 - closed when the run ends
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_run", str(spec_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
                running[slot] = (spec, proc, spec_path, log)
                print(f"ttq: started {spec.name} (slot {slot}, pid {proc.pid}, log {log.name})", flush=True)
            time.sleep(0.2)
            for slot, (spec, proc, spec_path, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                if not _collect(spec, spec_path, results):
                    failed += 1
                    print(f"ttq: FAILED {spec.name} (exit {proc.returncode}); see {log.name}; not recorded, a rerun "
                          f"retries it", file=sys.stderr, flush=True)
    finally:
        for spec, proc, spec_path, log in running.values():  # interrupted: stop our own children, by pid
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
            log.close()
            _collect(spec, spec_path, results)  # a run that finished just before the signal still counts
    return failed


def _collect(spec: RunSpec, spec_path: Path, results: Results) -> bool:
    """Append the run's record if its process wrote one (atomically, as its last act): the record, not the
    exit status, says the run finished."""
    result = spec_path.with_suffix(".result.json")
    if not result.is_file():
        return False
    record = json.loads(result.read_text())
    results.add(record)
    last = record["points"][-1] if record["points"] else {}
    print(f"ttq: finished {spec.name}: {record['outcome']}, {last.get('step', 0)} G steps in "
          f"{last.get('spent_s', 0):.0f} s of budget, {record['wall_s']:.0f} s wall", flush=True)
    return True


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _visible_gpus(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s for s in seen.split(",") if s.strip()] if seen else [str(i) for i in range(n)]
    return ids[:n] if n else []


# ---------------------------------------------------------------------------------------------------- CLI


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=tuple(PROFILES), default="smoke",
                    help="budgets, eval points, N, model size (default smoke); every value below overrides it")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/time_to_quality-PROFILE)")
    ap.add_argument("--workloads", default=None, help="comma list of: " + ", ".join(WORKLOADS)
                    + " (default: both for cpu/gpu, stacked for smoke)")
    ap.add_argument("--variants", default=None, help="comma list of keys or labels: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; smoke 0,1)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of the budget clock per run")
    ap.add_argument("--points", default=None, help="budget fractions to evaluate at, e.g. 0.25,0.5,0.75,1")
    ap.add_argument("--eval-samples", type=int, default=None, help="N generated samples per evaluation")
    ap.add_argument("--resolution", type=int, default=None, help="emoji resolution (stacked is always 32)")
    ap.add_argument("--width", type=int, default=None, help="model.width")
    ap.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    ap.add_argument("--stacked-count", type=int, default=None, help="Stacked-Digits training images")
    ap.add_argument("--clock", choices=CLOCKS, default=None, help="budget clock (module docstring)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (0: torch's default)")
    ap.add_argument("--parallel", type=int, default=None, help="runs at once, each its own process")
    ap.add_argument("--target-modes", default="final:wgan-gp",
                    help="modes target: a number or final:VARIANT (default final:wgan-gp)")
    ap.add_argument("--target-fid", default="final:wgan-gp",
                    help="FID target: a number or final:VARIANT (default final:wgan-gp)")
    ap.add_argument("--emoji-dir", type=Path, default=Path("data/emoji"), help="emoji images (default data/emoji)")
    ap.add_argument("--data-dir", type=Path, default=None, help="where shards are made (default OUT/data)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeatable), e.g. tracking.enabled=false")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md and the plots from the JSON")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._run:
        return args
    p = PROFILES[args.profile]
    args.seeds_text = args.seeds
    args.out = args.out or Path(f"runs/time_to_quality-{args.profile}")
    args.data_dir = args.data_dir or args.out / "data"
    try:
        args.workloads = _csv(args.workloads) if args.workloads else (["stacked"] if args.profile == "smoke"
                                                                      else list(WORKLOADS))
        for w in args.workloads:
            if w not in WORKLOADS:
                raise ValueError(f"--workloads: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
        variants = tuple(dict.fromkeys(variant_key(v) for v in _csv(args.variants))) if args.variants else None
        try:
            args.seeds = list(dict.fromkeys(int(s) for s in _csv(args.seeds))) if args.seeds else list(p.seeds)
        except ValueError:
            args.seeds = []
        if not args.seeds or min(args.seeds) < 0:
            raise ValueError(f"--seeds {args.seeds_text}: one or more integers >= 0, e.g. 0,1,2")
        fractions = tuple(float(f) for f in _csv(args.points)) if args.points else None
        args.workload_profiles = {}
        for w in args.workloads:
            wp = p.workloads[w]
            wp = dataclasses.replace(
                wp, budget_s=args.budget or wp.budget_s, fractions=fractions or wp.fractions,
                variants=variants or wp.variants, eval_samples=args.eval_samples or wp.eval_samples,
                resolution=(args.resolution or wp.resolution) if w == "emoji" else 32)
            budget_points(wp.budget_s, wp.fractions)
            args.workload_profiles[w] = wp
        for t in (args.target_modes, args.target_fid):
            check_target(t)
    except ValueError as e:
        raise usage_error(str(e).replace("could not convert string to float", "not a number")) from None
    args.clock = args.clock or p.clock
    args.device = args.device or p.device
    args.threads = p.threads if args.threads is None else args.threads
    args.parallel = args.parallel or p.parallel
    args.width = args.width or p.width
    args.batch_size = args.batch_size or p.batch_size
    args.stacked_count = args.stacked_count or p.stacked_count
    args.eval_batch = p.eval_batch
    for name in ("parallel", "width", "batch_size", "stacked_count", "eval_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise usage_error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.threads < 0:
        raise usage_error("--threads: must be >= 0")
    if args.clock == "process_cpu" and args.threads != 1:
        print("ttq: note: with --threads != 1 the process CPU clock sums all threads' time", flush=True)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipeline.errors import DataError
    from rgan_dist.errors import UsageError

    try:
        return _main(argv)
    except (UsageError, DataError) as e:  # a bad path, config value or network file: one line, never a traceback
        raise usage_error(str(e)) from None


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args._run:
        return worker_main(args._run)
    results = Results(args.out / "results.json")
    targets = {"stacked": args.target_modes, "emoji": args.target_fid}
    if args.report_only:
        if not results.runs:
            raise usage_error(f"{results.path}: no finished runs to report")
        files = write_report(args.out, results.data, targets)
        print("ttq: wrote " + ", ".join(map(str, files)))
        return 0

    from rgan_dist.config import load_config
    from rgan_dist.errors import UsageError
    from rgan_dist.tracking import resolve_store, ui_command

    try:  # every override checked before anything starts: a bad --set fails in one line, not in N runs
        base = load_config(CONFIG, args.set)
        probe = plan_runs(args, {w: "probe" for w in args.workloads})
        for spec in probe:
            load_config(CONFIG, spec.overrides)
    except UsageError as e:
        raise usage_error(str(e)) from None
    if args.dry_run:
        for spec in probe:
            print(f"{spec.name}: budgets {[round(b, 1) for b in spec.budgets]} s, clock {spec.clock}; "
                  + " ".join(spec.overrides))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise usage_error("--device cuda (the gpu profile): no CUDA device here; use --profile cpu")
    data = {w: prepare_data(w, args, args.workload_profiles[w].resolution) for w in args.workloads}
    specs = plan_runs(args, data)
    todo = [s for s in specs if results.finished(s) is None]
    given = list(argv) if argv is not None else sys.argv[1:]
    if todo:  # the invocations that ran something: the report names them (command, machine, load)
        results.data.setdefault("invocations", []).append({
            "command": shlex.join(["python", "benchmarks/time_to_quality.py", *given]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "profile": args.profile, "clock": args.clock,
            "machine": machine_info(args.device), "planned": len(specs), "to_run": len(todo)})
    results.data["clock"] = args.clock
    print(f"ttq: {len(specs)} runs planned, {len(specs) - len(todo)} already finished in {results.path}, "
          f"{len(todo)} to run, {args.parallel} at a time; clock {args.clock}", flush=True)

    uri = artifacts = None
    parent = None
    if base.tracking.enabled:
        uri, artifacts = resolve_store(base.tracking.mlflow_uri, artifact_root=base.tracking.artifact_root)
        parent = ParentRun(results, uri, artifacts, base.tracking.experiment, {
            "profile": args.profile, "clock": args.clock, "workloads": ",".join(args.workloads),
            "seeds": ",".join(map(str, args.seeds)), "parallel": args.parallel, "threads": args.threads,
            **{f"{w}.{k}": v for w, wp in args.workload_profiles.items() for k, v in dataclasses.asdict(wp).items()}})
        print(f"ttq: view it with: {ui_command(uri, artifacts)}", flush=True)
        for s in todo:
            s.parent_run_id = parent.run_id
    results.save()
    for w in args.workloads:  # FID reference statistics once, not once per parallel run
        first = next((s for s in todo if s.workload == w), None)
        if first is not None:
            warm_reference(first)
    status = "FAILED"
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` of a background benchmark stops its runs too
    try:
        failed = run_all(todo, results, args, uri)
        status = "FINISHED" if not failed else "FAILED"
    except KeyboardInterrupt:
        status, failed = "KILLED", -1
        print("ttq: interrupted; finished runs are kept, rerun the same command to continue", file=sys.stderr)
    files = write_report(args.out, results.data, targets) if results.runs else []
    if files:
        print("ttq: wrote " + ", ".join(map(str, [results.path, *files])), flush=True)
    if parent is not None:
        parent.finish([results.path, *files], status)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
