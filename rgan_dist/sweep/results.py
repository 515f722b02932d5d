"""The results table: one row per trial, sorted by best FID, as Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rgan_dist.sweep.space import describe_trial, trial_overrides, trial_run_name
from rgan_dist.tracking_spool import unsent

if TYPE_CHECKING:
    from rgan_dist.sweep.spec import SweepConfig


@dataclass
class TrialRow:
    trial_id: str
    name: str
    params: dict[str, str]
    overrides: dict[str, Any]
    best_fid: float | None
    final_fid: float | None
    step: int
    outcome: str
    restored_from_step: int = 0
    mlflow_run_id: str = ""
    paper_fid: str = ""
    rank: int = 0
    error: str = ""
    node_id: str = ""  # the Ray node of the trial's last report
    tracking: str = ""  # "incomplete (N unsent)" when some of its MLflow records are not in the store


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if not math.isnan(f) else None


def collect_rows(results: Any, spec: SweepConfig) -> list[TrialRow]:
    """One row per trial of a Tune ResultGrid, best FID first (trials without an FID last)."""
    from rgan_dist.paper_reference import paper_fid

    steps = spec.base_config.train.steps
    base_flat = spec.base_config.flat()
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = str(m.get("trial_id") or Path(r.path).name.removeprefix("trial_"))
        overrides = trial_overrides(r.config or {})
        step = int(m.get("step") or 0)
        if r.error is not None:
            outcome = "error"
        elif m.get("diverged"):
            outcome = "diverged"
        elif step >= steps:
            outcome = "completed"
        elif step:
            outcome = "stopped early"
        else:
            outcome = "no report"
        best = _num(m.get("best_fid"))
        if best is not None and not math.isfinite(best):
            best = None
        cell = paper_fid(spec.paper, {**base_flat, **overrides}) if spec.paper else None
        error = ""
        if r.error is not None:
            error = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1][:200]
        rows.append(TrialRow(trial_id=trial_id, name=trial_run_name(spec.name, trial_id, r.config or {}),
                             params=describe_trial(r.config or {}), overrides=overrides, best_fid=best,
                             final_fid=_num(m.get("fid")), step=step, outcome=outcome,
                             restored_from_step=int(m.get("restored_from_step") or 0),
                             mlflow_run_id=str(m.get("mlflow_run_id") or ""), node_id=str(m.get("node_id") or ""),
                             paper_fid=cell.text() if cell else "", error=error,
                             tracking=_tracking_state(spec.out_path / "trials" / trial_id)))
    rows.sort(key=lambda x: (x.best_fid is None, x.best_fid if x.best_fid is not None else 0.0, x.trial_id))
    for i, row in enumerate(rows, 1):
        row.rank = i
    return rows


def _tracking_state(trial_dir: Path) -> str:
    """The trial's MLflow records still kept in its run folder (`rgan_dist.tracking_spool`): a row whose MLflow
    run lacks data says so, instead of looking complete."""
    n = unsent(trial_dir)
    return f"incomplete ({n} unsent, kept in {trial_dir})" if n else ""


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if math.isfinite(v) else "inf"


def results_table(rows: list[TrialRow], keys: list[str], paper: str = "") -> str:
    head = ["#", "trial", *keys, "best FID", "final FID", "step", "outcome"] + (["paper FID"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in ("#", "best FID", "final FID", "step",
                                                                          "paper FID") else "---" for h in head) + "|"]
    for r in rows:
        outcome = r.outcome + (f" ({r.error[:100]})" if r.error else "")
        if r.restored_from_step:
            outcome += f", resumed at step {r.restored_from_step}"
        if r.tracking:
            outcome += f", MLflow tracking {r.tracking}"
        cells = [str(r.rank), r.name, *(r.params.get(k, "") for k in keys), _fmt(r.best_fid), _fmt(r.final_fid),
                 str(r.step), outcome] + ([r.paper_fid or "–"] if paper else [])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[TrialRow], spec: SweepConfig) -> tuple[str, list[Path]]:
    """results.md (the table, and the paper beside it when the sweep names a table), results.csv, results.json."""
    keys = spec.varied_keys
    table = results_table(rows, keys, spec.paper)
    cfg = spec.base_config
    text = [f"# Sweep `{spec.name}`: {len(rows)} trial(s), sorted by best FID", "", table, "",
            f"FID: {cfg.eval.num_samples} generated samples vs the training data's statistics, every "
            f"{cfg.eval.every} steps (lower is better). Scheduler: {spec.scheduler.name}."]
    if spec.paper:
        from rgan_dist.paper_reference import beside_paper

        base_flat = cfg.flat()
        text += ["", "## Beside the paper", "",
                 "Our FID here is each trial's last one (the paper reports the FID at the end of training); a "
                 "trial stopped early has none.", "",
                 beside_paper(((r.name, {**base_flat, **r.overrides}, r.final_fid if r.outcome == "completed" else None)
                               for r in rows), spec.paper)]
    spec.out_path.mkdir(parents=True, exist_ok=True)
    md = spec.out_path / "results.md"
    md.write_text("\n".join(text) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "trial_id", "run_name", *keys, "best_fid", "final_fid", "step", "outcome",
                     "restored_from_step", "mlflow_run_id", "paper_fid", "error", "node_id", "tracking"])
    for r in rows:
        writer.writerow([r.rank, r.trial_id, r.name, *(r.params.get(k, "") for k in keys), r.best_fid, r.final_fid,
                         r.step, r.outcome, r.restored_from_step, r.mlflow_run_id, r.paper_fid, r.error, r.node_id,
                         r.tracking])
    csv_path = spec.out_path / "results.csv"
    csv_path.write_text(buf.getvalue())
    js = spec.out_path / "results.json"
    js.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str) + "\n")
    return table, [md, csv_path, js]
