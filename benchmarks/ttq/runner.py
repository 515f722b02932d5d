"""Running the plan: the FID references computed once (the data: benchmarks/ttq/data.py), then every run in
its own process, `--parallel` at a time, each finished run appended to the results as it lands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.ttq.profiles import CONFIG, SCRIPT
from benchmarks.ttq.results import Results
from benchmarks.ttq.run import RunSpec


def warm_reference(spec: RunSpec) -> None:
    """Compute the workload's FID reference statistics once, before parallel runs would each do it (and race
    on the cache file): the very call the runs' evaluator makes, so they find it cached."""
    from rgan_dist.config import load_config
    from rgan_dist.metrics.evaluator import reference_stats
    from rgan_dist.metrics.inception import load_inception

    cfg = load_config(CONFIG, spec.overrides)
    if "fid" not in cfg.eval.metrics:
        return
    t0 = time.perf_counter()
    net = load_inception(cfg.eval.inception or None, device="cuda" if cfg.run.device == "cuda" else "cpu")
    e = cfg.eval
    stats = reference_stats(cfg.eval.reference_data or cfg.data.shards, net, resolution=cfg.model.resolution,
                            num_samples=e.reference_samples or e.num_samples, batch_size=e.batch_size,
                            keep_features=e.kid)
    print(f"ttq: FID reference statistics of {stats.n} real images ready ({time.perf_counter() - t0:.0f} s)",
          flush=True)


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
                proc = subprocess.Popen([sys.executable, str(SCRIPT), "--_run", str(spec_path)],
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


def _visible_gpus(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s for s in seen.split(",") if s.strip()] if seen else [str(i) for i in range(n)]
    return ids[:n] if n else []
