"""One run, in its own process: the plan of runs (`RunSpec`), the budget clock, and `run_one`, which steps the
project's own `Trainer` to each budget point and evaluates there (`worker_main` is the child's entry)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.ttq.measure import budget_points, fmt_value, train_until
from benchmarks.ttq.profiles import CONFIG, METRIC_OVERRIDES, VARIANTS, WORKLOADS
from benchmarks.ttq.recipe import recipe_for, recipe_overrides


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
    data_seed: int = 0
    parent_run_id: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.workload, self.variant, self.seed)

    @property
    def name(self) -> str:
        return f"{self.workload}-{self.variant}-seed{self.seed}"

    def settings(self) -> dict[str, Any]:
        """What must match for a stored record to count as this run (paths and tracking excluded; the data is
        named by its seed)."""
        keep = [o for o in self.overrides if not o.startswith(("run.", "tracking.", "data.shards=",
                                                                "eval.reference_data="))]
        return {"budgets": [round(b, 6) for b in self.budgets], "clock": self.clock, "threads": self.threads,
                "overrides": keep, "data_seed": self.data_seed}


def plan_runs(args: argparse.Namespace, data: dict[str, str], references: dict[str, str] | None = None
              ) -> list[RunSpec]:
    """Seed-major order (seed 0 of every variant first), so a partial benchmark already compares variants.
    `data`: each workload's training shards; `references`: the FID reference data of a workload whose
    reference is not its training data (small data: the whole vendor set)."""
    out: list[RunSpec] = []
    for wname in args.workloads:
        wp = args.workload_profiles[wname]
        budgets = budget_points(wp.budget_s, wp.fractions)
        fractions = [b / wp.budget_s for b in budgets]
        reference = (references or {}).get(wname)
        start = [f"data.shards={data[wname]}", f"model.resolution={wp.resolution}", f"model.width={args.width}",
                 f"train.batch_size={args.batch_size}", f"run.device={args.device}",
                 f"eval.batch_size={args.eval_batch}",
                 *METRIC_OVERRIDES[wname], *eval_sample_overrides(wname, wp.eval_samples),
                 *([f"eval.reference_data={reference}"] if reference else [])]
        for seed in args.seeds:
            for vkey in wp.variants:
                if vkey in wp.first_seed_only and seed != args.seeds[0]:
                    continue
                if VARIANTS[vkey].recipes and wname not in VARIANTS[vkey].recipes:
                    continue  # a recipe variant of another workload's recipe (recipe-r3gan: stacked only)
                overrides = [
                    *start, *variant_overrides(vkey, wname, start, wp.resolution), f"train.seed={seed}", *args.set,
                    f"run.name=ttq-{wname}-{vkey}-seed{seed}",
                    f"run.out_dir={args.out / 'runs' / wname / vkey / f'seed{seed}'}",
                ]
                out.append(RunSpec(workload=wname, variant=vkey, seed=seed, overrides=overrides, budgets=budgets,
                                   fractions=fractions, clock=args.clock, threads=args.threads,
                                   out_dir=str(args.out / "runs" / wname / vkey / f"seed{seed}"),
                                   data_seed=wp.data_seed))
    return out


def variant_overrides(vkey: str, workload: str, start: list[str], resolution: int) -> tuple[str, ...]:
    """The variant's overrides; a recipe variant's come after its workload's recipe at that resolution
    (`recipe_for`, `recipe_overrides`)."""
    v = VARIANTS[vkey]
    if not v.recipes:
        return v.overrides
    if workload not in v.recipes:
        raise ValueError(f"variant {vkey} has no recipe for the {workload} workload")
    return (*recipe_overrides(recipe_for(v.recipes[workload], resolution), tuple(start)), *v.overrides)


def eval_sample_overrides(workload: str, n: int) -> tuple[str, ...]:
    """N of the workload's metric: FID/KID of N generated vs N real images (small data: vs every image of the
    reference set, however many); modes of N generated stacks."""
    if workload == "emoji":
        return (f"eval.num_samples={n}", f"eval.reference_samples={n}")
    if workload == "smalldata":
        return (f"eval.num_samples={n}", "eval.reference_samples=1000000")  # capped at the set's size
    return (f"eval.modes_samples={n}",)


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
    from rgan_dist.run_info import run_tags
    from rgan_dist.tracking import make_tracker

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
                         "metrics": {k: float(v) for k, v in metrics.items()}, "losses": losses,
                         # where ADA (or a schedule) had driven p: the reading of an augmented run needs it
                         "augment_p": trainer.augment.p if trainer.augment is not None else None}
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
            "data_seed": spec.data_seed, "outcome": outcome, "error": error, "points": points,
            "settings": spec.settings(),
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
