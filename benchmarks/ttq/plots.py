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


def sample_sheet(name: str, runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Each run's last sample grid (`<run.out_dir>/samples/step_*.png`, the EMA generator at the budget's end)
    at its own pixels, side by side under a caption of its variant and seed: what the numbers look like. Only
    runs whose folder is on this machine are drawn (the JSON holds numbers, not images), so `--report-only`
    elsewhere makes none. JPEG (quality 92): a sheet of 64x64 grids is megabytes as PNG."""
    from PIL import Image, ImageDraw

    grids = []
    for vkey in VARIANTS:
        for r in sorted((r for r in runs if r["variant"] == vkey), key=lambda r: r["seed"]):
            found = sorted(Path(r.get("config", {}).get("run.out_dir", "/nonexistent")).glob("samples/step_*.png"))
            if found:
                with Image.open(found[-1]) as im:
                    grids.append((f"{VARIANTS[vkey].label}, seed {r['seed']}", im.convert("RGB")))
    if not grids:
        return None
    cols, caption, pad = min(len(grids), 3), 18, 6
    w = max(g.width for _, g in grids) + pad
    h = max(g.height for _, g in grids) + caption + pad
    rows = -(-len(grids) // cols)
    sheet = Image.new("RGB", (cols * w + pad, rows * h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, grid) in enumerate(grids):
        x, y = pad + (i % cols) * w, pad + (i // cols) * h
        draw.text((x, y + 2), title, fill="black")
        sheet.paste(grid, (x, y + caption))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=92)
    return path
