"""`rgan report`: a paper-style table and FID curves for every run of one MLflow experiment.

Read-only on the tracking store. The table is what a results section needs (loss variant, best and
final FID, steps, wall-clock, images/s); the FID provenance (network sha256, resize, N) is checked
across runs and printed under the table, because FIDs computed differently are not comparable and a
table that mixes them must say so.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rgan_dist.errors import UsageError
from rgan_dist.tracking import bound_http_retries, metric_history, resolve_store

PROVENANCE_TAGS = ("fid.network_source", "fid.network_sha256", "fid.resize", "fid.num_samples",
                   "fid.reference_samples", "fid.reference_data")


@dataclass
class RunSummary:
    run_id: str
    name: str
    variant: str
    status: str
    steps: int
    wall_clock_s: float
    img_per_s: float | None
    best_fid: float | None
    best_step: int | None
    final_fid: float | None
    final_step: int | None
    fid_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds since start, fid)
    provenance: dict[str, str] = field(default_factory=dict)
    sweep: str | None = None  # the sweep (its parent run's name) this run is a trial of
    parent_run_id: str | None = None


def _client(uri: str | None) -> tuple[Any, str]:
    from mlflow import MlflowClient

    resolved, _ = resolve_store(uri or "")
    if resolved.startswith("sqlite:///"):
        db = Path(resolved[len("sqlite:///"):])
        if not db.is_file():  # MLflow would silently create an empty store here
            raise UsageError(f"no MLflow store at {db}: run rgan report where training ran, or pass --tracking-uri")
    bound_http_retries()
    return MlflowClient(tracking_uri=resolved), resolved


def _variant(params: dict[str, str]) -> str:
    name = params.get("loss.name", "?")
    penalty = params.get("loss.penalty", "none")
    return name if penalty in ("none", "") else f"{name} + {penalty}"


def summarize_experiment(experiment: str, tracking_uri: str | None = None) -> list[RunSummary]:
    """One summary per run of `experiment`, best FID first (runs without FID last, newest first).

    A sweep's parent run (the run its trials name in `mlflow.parentRunId`) is no row: it trains nothing, so it
    had a row of "?" and made "5 runs" of 4 trials. Its trials carry its name (`sweep`) for the header."""
    client, resolved = _client(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:
        raise UsageError(f"cannot read the MLflow store {resolved}: {type(e).__name__}: {e}") from None
    if exp is None:
        names = sorted(x.name for x in client.search_experiments())
        raise UsageError(f"--experiment {experiment!r}: not in {resolved}; experiments there: "
                         f"{', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time DESC"])
    names = {run.info.run_id: run.info.run_name or run.info.run_id[:8] for run in runs}
    parents = {p for run in runs if (p := run.data.tags.get("mlflow.parentRunId")) in names}
    out = []
    for run in runs:
        info, data = run.info, run.data
        if info.run_id in parents:
            continue
        parent = data.tags.get("mlflow.parentRunId")
        start = info.start_time or 0
        fid = sorted(metric_history(client, info.run_id, "fid"), key=lambda m: (m.step, m.timestamp))
        speed = metric_history(client, info.run_id, "img_per_s")
        last_ts = max([m.timestamp for m in fid] + [m.timestamp for m in speed] + [start])
        end = info.end_time or last_ts
        steps = max([m.step for m in speed] + [m.step for m in fid] + [0])
        curve = [(int(m.step), (m.timestamp - start) / 1000.0, float(m.value)) for m in fid
                 if math.isfinite(m.value)]
        best = min(curve, key=lambda c: c[2]) if curve else None
        out.append(RunSummary(
            run_id=info.run_id, name=info.run_name or info.run_id[:8], variant=_variant(data.params),
            status=info.status, steps=int(steps), wall_clock_s=max(0.0, (end - start) / 1000.0),
            # The first window includes start-up (compilation, data warm-up): the median is the steady rate.
            img_per_s=statistics.median(m.value for m in speed) if speed else None,
            best_fid=best[2] if best else None, best_step=best[0] if best else None,
            final_fid=curve[-1][2] if curve else None, final_step=curve[-1][0] if curve else None,
            fid_curve=curve, provenance={k: data.tags[k] for k in PROVENANCE_TAGS if k in data.tags},
            sweep=names.get(parent) if parent else None, parent_run_id=parent))
    out.sort(key=lambda r: (r.best_fid is None, r.best_fid if r.best_fid is not None else 0.0))
    return out


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def header(experiment: str, runs: list[RunSummary]) -> str:
    """The report's title: the experiment, its run count, and each sweep as the parent of its trials."""
    sweeps: dict[tuple[str, str], int] = {}
    for r in runs:
        if r.parent_run_id:
            key = (r.sweep or r.parent_run_id[:8], r.parent_run_id)
            sweeps[key] = sweeps.get(key, 0) + 1
    lines = [f"# Experiment `{experiment}`: {len(runs)} run(s)"]
    lines += [f"Sweep `{name}` (parent run {rid[:8]}): {n} trial(s)" for (name, rid), n in sweeps.items()]
    return "\n\n".join(lines)


def markdown_table(runs: list[RunSummary]) -> str:
    names = [r.name for r in runs]
    rows = ["| Run | Loss | Best FID (step) | Final FID (step) | Steps | Wall-clock | img/s | Status |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        name = r.name if names.count(r.name) == 1 else f"{r.name} ({r.run_id[:8]})"
        best = f"{_num(r.best_fid)} ({r.best_step})" if r.best_fid is not None else "–"
        final = f"{_num(r.final_fid)} ({r.final_step})" if r.final_fid is not None else "–"
        rows.append(f"| {name} | {r.variant} | {best} | {final} | {r.steps} | {_clock(r.wall_clock_s)} | "
                    f"{_num(r.img_per_s, '.0f')} | {r.status} |")
    return "\n".join(rows)


def provenance_note(runs: list[RunSummary]) -> str:
    """How the FIDs were computed, or a warning naming what differs between runs."""
    with_fid = [r for r in runs if r.best_fid is not None]
    if not with_fid:
        return "No run logged an FID (train with eval.every > 0)."
    lines = []
    for key in PROVENANCE_TAGS:
        values = sorted({r.provenance.get(key, "unknown") for r in with_fid})
        label = key.removeprefix("fid.")
        if len(values) == 1:
            lines.append(f"{label}: {values[0]}")
        else:
            lines.append(f"**{label} differs between runs ({', '.join(values)}): those FIDs are not comparable**")
    return "FID computed with " + "; ".join(lines) + "."


def plot_curves(runs: list[RunSummary], out_dir: Path) -> list[Path]:
    """fid_vs_step.png and fid_vs_time.png, one line per run that logged FID."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_fid = [r for r in runs if r.fid_curve]
    longest = max((c[1] for r in with_fid for c in r.fid_curve), default=0.0)
    scale, unit = (3600.0, "hours") if longest > 3 * 3600 else (60.0, "minutes") if longest > 180 else (1.0, "seconds")
    paths = []
    for name, x_of, xlabel in (("fid_vs_step.png", lambda c: c[0], "generator step"),
                               ("fid_vs_time.png", lambda c: c[1] / scale, f"wall-clock ({unit})")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in with_fid:
            ax.plot([x_of(c) for c in r.fid_curve], [c[2] for c in r.fid_curve], marker="o", markersize=3,
                    label=f"{r.name} ({r.variant})")
        ax.set_xlabel(xlabel)
        if name == "fid_vs_step.png":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("FID (lower is better)")
        ax.grid(alpha=0.3)
        if with_fid:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no FID logged", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(experiment: str, out_dir: str | Path, tracking_uri: str | None = None
                 ) -> tuple[dict[str, Path], list[RunSummary]]:
    """report.md (table, provenance, plots), the two PNGs and runs.json, in `out_dir`; returns their
    paths and the run summaries."""
    runs = summarize_experiment(experiment, tracking_uri)
    if not runs:
        raise UsageError(f"--experiment {experiment!r}: holds no runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step_png, time_png = plot_curves(runs, out)
    text = "\n\n".join([
        header(experiment, runs),
        markdown_table(runs),
        provenance_note(runs),
        f"![FID against step]({step_png.name})\n\n![FID against wall-clock time]({time_png.name})",
    ]) + "\n"
    md = out / "report.md"
    md.write_text(text)
    data = out / "runs.json"
    data.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    return {"markdown": md, "fid_vs_step": step_png, "fid_vs_time": time_png, "runs": data}, runs
