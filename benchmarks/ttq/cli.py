"""The command line (`python benchmarks/time_to_quality.py`): flags checked in one line each, then plan, run,
report."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.ttq.data import prepare_data
from benchmarks.ttq.measure import budget_points, check_target, variant_key
from benchmarks.ttq.parent import ParentRun
from benchmarks.ttq.profiles import CLOCKS, CONFIG, PROFILES, SCRIPT, VARIANTS, WORKLOADS, usage_error
from benchmarks.ttq.report import write_report
from benchmarks.ttq.results import Results, machine_info
from benchmarks.ttq.run import plan_runs, worker_main
from benchmarks.ttq.runner import run_all, warm_reference


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(ast.get_docstring(ast.parse(SCRIPT.read_text())) or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=tuple(PROFILES), default="smoke",
                    help="budgets, eval points, N, model size (default smoke); every value below overrides it")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/time_to_quality-PROFILE)")
    ap.add_argument("--workloads", default=None, help="comma list of: " + ", ".join(WORKLOADS)
                    + " (default: the profile's workloads; stacked for smoke)")
    ap.add_argument("--variants", default=None, help="comma list of keys or labels: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; smoke 0,1)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of the budget clock per run")
    ap.add_argument("--points", default=None, help="budget fractions to evaluate at, e.g. 0.25,0.5,0.75,1")
    ap.add_argument("--eval-samples", type=int, default=None, help="N generated samples per evaluation")
    ap.add_argument("--resolution", type=int, default=None,
                    help="emoji and small-data resolution (stacked is always 32)")
    ap.add_argument("--width", type=int, default=None, help="model.width")
    ap.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    ap.add_argument("--stacked-count", type=int, default=None, help="Stacked-Digits training images")
    ap.add_argument("--data-seed", type=int, default=None,
                    help="seed of the Stacked-Digits draw and of the small-data subset (default: the profile's)")
    ap.add_argument("--clock", choices=CLOCKS, default=None, help="budget clock (module docstring)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (0: torch's default)")
    ap.add_argument("--parallel", type=int, default=None, help="runs at once, each its own process")
    ap.add_argument("--target-modes", default=None,
                    help="modes target: a number or final:VARIANT (default final:wgan-gp; cpu-long: 995)")
    ap.add_argument("--target-fid", default="final:wgan-gp",
                    help="FID target: a number or final:VARIANT (default final:wgan-gp)")
    ap.add_argument("--emoji-dir", type=Path, default=Path("data/emoji"),
                    help="emoji images, one folder per vendor (default data/emoji)")
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
                                                                      else list(p.workloads))
        for w in args.workloads:
            if w not in WORKLOADS:
                raise ValueError(f"--workloads: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
            if w not in p.workloads:
                have = [n for n, q in PROFILES.items() if w in q.workloads]
                raise ValueError(f"--workloads {w}: not in profile {args.profile} (its workloads: "
                                 f"{', '.join(p.workloads)}); profiles with it: {', '.join(have)}")
        if args.data_seed is not None and args.data_seed < 0:
            raise ValueError(f"--data-seed {args.data_seed}: must be >= 0")
        variants = tuple(dict.fromkeys(variant_key(v) for v in _csv(args.variants))) if args.variants else None
        for v in variants or ():  # a recipe variant runs on the workloads its recipes name, and nowhere else
            if VARIANTS[v].recipes and not set(VARIANTS[v].recipes) & set(args.workloads):
                raise ValueError(f"--variants {v}: runs on {', '.join(VARIANTS[v].recipes)} only, not on "
                                 f"{', '.join(args.workloads)}")
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
                resolution=(args.resolution or wp.resolution) if w != "stacked" else 32,
                data_seed=wp.data_seed if args.data_seed is None else args.data_seed)
            budget_points(wp.budget_s, wp.fractions)
            args.workload_profiles[w] = wp
        args.target_modes = args.target_modes or p.target_modes
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
    targets = {"stacked": args.target_modes, "emoji": args.target_fid, "smalldata": None}
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
        probe = plan_runs(args, {w: "probe" for w in args.workloads}, {w: "probe-reference" for w in args.workloads
                                                                       if w == "smalldata"})
        for spec in probe:
            load_config(CONFIG, spec.overrides)
    except (UsageError, ValueError) as e:
        raise usage_error(str(e)) from None
    if args.dry_run:
        for spec in probe:
            seed = f", data seed {spec.data_seed}" if spec.data_seed else ""
            print(f"{spec.name}: budgets {[round(b, 1) for b in spec.budgets]} s, clock {spec.clock}{seed}; "
                  + " ".join(spec.overrides))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise usage_error("--device cuda (the gpu profile): no CUDA device here; use --profile cpu")
    made = {w: prepare_data(w, args, wp.resolution, wp.data_seed) for w, wp in args.workload_profiles.items()}
    specs = plan_runs(args, {w: m[0] for w, m in made.items()}, {w: m[1] for w, m in made.items() if m[1]})
    todo = [s for s in specs if results.finished(s) is None]
    given = list(argv) if argv is not None else sys.argv[1:]
    if todo:  # the invocations that ran something: the report names them (command, machine, load)
        results.data.setdefault("invocations", []).append({
            "command": shlex.join(["python", "benchmarks/time_to_quality.py", *given]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "profile": args.profile, "clock": args.clock,
            "machine": machine_info(args.device), "planned": len(specs), "to_run": len(todo),
            "data_seeds": {w: wp.data_seed for w, wp in args.workload_profiles.items()}})
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
