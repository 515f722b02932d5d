"""The markdown report: per workload, the per-seed table, per-variant mean and min..max over seeds, and time to
target; the section `benchmarks/RESULTS.md` takes verbatim (`--report-only` regenerates it from the JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.ttq.measure import fmt_value, resolve_target, spread, time_to_target, value_at
from benchmarks.ttq.plots import plot_workload, sample_sheet
from benchmarks.ttq.profiles import VARIANTS, WORKLOADS


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
    reference = cfg.get("eval.reference_data")
    against = f" against every image of `{Path(reference).name}`" if reference else ""
    lines.append(f"Budget {_secs(budgets[-1])} per run ({_clock_words(first['settings']['clock'])}); evaluated at "
                 f"{', '.join(_secs(b) for b in budgets)}; N = {n_eval} generated samples per evaluation{against}; "
                 f"data seed {first['settings'].get('data_seed', 0)}; {_models(runs)}. " + target_text)
    lines.append("")
    # Where ADA drove p by the end: an augmented run's reading needs it (a p near 1 can leak into G).
    # Records from before it was kept have no such key, and show "-".
    show_p = any(r["points"] and r["points"][-1].get("augment_p") is not None for r in runs)
    head = ["variant", "seed", *[f"{wl.metric} @ {_secs(b)}" for b in budgets], f"{wl.secondary} @ end",
            *(["augment p @ end"] if show_p else []), "G steps", "time to target"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        pts = r["points"]
        ttt = time_to_target(pts, wl.metric, tgt[0], wl.higher_is_better) if tgt else None
        p_end = pts[-1].get("augment_p") if pts else None
        cells = [r["label"], str(r["seed"]), *[fmt_value(wl.metric, value_at(r, f, wl.metric)) for f in fractions],
                 fmt_value(wl.secondary, value_at(r, 1.0, wl.secondary)),
                 *([("-" if p_end is None else f"{p_end:.2f}")] if show_p else []),
                 str(pts[-1]["step"]) if pts else "-",
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


def _models(runs: list[dict[str, Any]]) -> str:
    """The model and batch of the runs: one phrase when every variant shares them, else one per variant."""
    def text(cfg: dict[str, Any]) -> str:
        arch = cfg.get("model.arch")
        size = f"stage widths {cfg.get('model.stage_widths')}" if arch == "r3gan" else f"width {cfg.get('model.width')}"
        return f"{arch} {size}, batch {cfg.get('train.batch_size')}"

    per = {r["label"]: text(r.get("config", {})) for r in runs}
    if len(set(per.values())) == 1:
        return next(iter(per.values()))
    return "; ".join(f"{label}: {t}" for label, t in per.items())


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
            sheet = sample_sheet(name, runs, out / f"time_to_quality_{name}_samples.jpg")
            files.extend([sheet] if sheet is not None else [])
    md = out / "results.md"
    md.write_text(markdown_report(data, targets, plots))
    return [md, *files]
