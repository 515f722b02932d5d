"""The plot per workload: metric vs budget seconds, mean with a min..max band per variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.ttq.measure import spread, value_at
from benchmarks.ttq.profiles import VARIANTS, WORKLOADS


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
