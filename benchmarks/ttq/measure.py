"""The budget arithmetic and the judging of a run: budget points, training until the next one, whether a value
meets a target, time to target, the spread over seeds, and reading `--target-*` specs. Pure functions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from benchmarks.ttq.profiles import VARIANTS


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
