"""Search spaces and schedulers: a sweep file's `space:` entries as Tune domains, the trials a grid
makes, the Tune scheduler, and how a trial's sampled values read as config overrides and names."""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Any, Protocol

from rgan_dist.errors import ConfigError

if TYPE_CHECKING:
    from rgan_dist.config import Config

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "lograndint")
GROUP_LABEL = "label"  # inside a group's mapping: a display name, not a config key


class Sweep(Protocol):
    """What this module reads of a checked sweep file (`spec.SweepConfig`), named here so that the checker
    (`spec`, which uses this module's `distribution` and friends) stays the only one of the two importing
    the other."""

    space: dict[str, Any]
    num_samples: int
    scheduler: Any  # spec.SchedulerConfig
    base_config: Config


def error_at(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def distribution(spec: Any, where: str) -> tuple[str, Any]:
    """(kind, values) of one space entry: a fixed value, or `{grid|choice: [...]}`, `{uniform|loguniform:
    [lo, hi]}`, `{randint|lograndint: [lo, hi]}` (hi exclusive)."""
    if not isinstance(spec, dict):
        return "fixed", spec
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise error_at(where, f"expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{grid: [a, b]}} or "
                          f"{{loguniform: [1.0e-5, 1.0e-3]}}), got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise error_at(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint", "lograndint"):
        if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise error_at(where, f"{kind} needs [low, high] numbers, got {values!r}")
        lo, hi = values
        if not lo < hi:
            raise error_at(where, f"{kind} needs low < high, got {values!r}")
        if kind.startswith("log") and lo <= 0:
            raise error_at(where, f"{kind} needs low > 0, got {values!r}")
        if kind.endswith("randint") and not all(float(v).is_integer() for v in values):
            raise error_at(where, f"{kind} needs integers, got {values!r}")
    return kind, values


def candidates(kind: str, values: Any) -> list[Any]:
    """Values that stand for an entry when checking it: every listed value, or a range's two ends."""
    if kind == "fixed":
        return [values]
    if kind in ("grid", "choice"):
        return list(values)
    if kind.endswith("randint"):
        return [int(values[0]), int(values[1]) - 1]
    return list(values)


def as_overrides(key: str, value: Any) -> dict[str, Any]:
    """One space entry's sampled value as config overrides (a group's mapping is several keys)."""
    if "." in key:
        return {key: value}
    return {k: v for k, v in value.items() if k != GROUP_LABEL}



def _domain(kind: str, values: Any) -> Any:
    from ray import tune

    if kind == "fixed":
        return values
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "loguniform":
        return tune.loguniform(*values)
    if kind == "randint":
        return tune.randint(int(values[0]), int(values[1]))
    return tune.lograndint(int(values[0]), int(values[1]))


class Group(dict):
    """A group entry's mapping (several keys set together) as Tune holds it: still the mapping that
    `trial_overrides` reads, but shown by its label. Tune's progress table prints a parameter with `str()`
    cut to 20 characters: a plain dict showed as "...lr_d': 0.0001, 't" in the "setup" column."""

    def __str__(self) -> str:
        return group_label(self)


def _grouped(key: str, kind: str, values: Any) -> tuple[str, Any]:
    if "." in key or kind not in ("fixed", "grid", "choice"):
        return kind, values
    if kind == "fixed":
        return kind, Group(values) if isinstance(values, dict) else values
    return kind, [Group(v) if isinstance(v, dict) else v for v in values]


def param_space(spec: Sweep) -> dict[str, Any]:
    return {key: _domain(*_grouped(key, *distribution(value, key))) for key, value in spec.space.items()}


def planned_trials(spec: Sweep) -> list[dict[str, Any]]:
    """The trials the grid makes (per `num_samples` repeat), in Tune's order (the first grid key varies
    fastest), each as a Tune config; a non-grid entry stays its distribution and is drawn per trial."""
    grid_keys = [k for k, v in spec.space.items() if distribution(v, k)[0] == "grid"]
    fixed = {k: v for k, v in spec.space.items() if k not in grid_keys}
    values = [distribution(spec.space[k], k)[1] for k in grid_keys]
    out = []
    for _ in range(spec.num_samples):
        for combo in itertools.product(*reversed(values)):
            out.append({**fixed, **dict(zip(grid_keys, reversed(combo), strict=True))})
    return out


def make_scheduler(spec: Sweep) -> Any:
    """The Tune scheduler; its time axis is our `step` (generator steps), reported with every FID."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s, cfg = spec.scheduler, spec.base_config
    if s.name == "asha":
        return ASHAScheduler(time_attr="step", max_t=s.max_t or cfg.train.steps,
                             grace_period=s.grace_period or cfg.eval.every, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        mutations = {k: (v if isinstance(v, list) else _domain(*distribution(v, k))) for k, v in s.mutations.items()}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval or
                                       cfg.eval.every, hyperparam_mutations=mutations,
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch)
    return FIFOScheduler()


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune config (dotted keys and groups) as flat `section.key -> value` overrides."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if "." in key:
            out[key] = value
        elif isinstance(value, dict):
            out.update(as_overrides(key, value))
    return out


def describe_trial(config: dict[str, Any]) -> dict[str, str]:
    """What varies in a trial, for tables and tags: a group shows its `label` (or its keys)."""
    return {key: group_label(value) if isinstance(value, dict) else _short(value) for key, value in config.items()}


def group_label(value: dict[str, Any]) -> str:
    """How a group's mapping reads in tables, tags and Tune's progress: its `label`, else its keys."""
    label = value.get(GROUP_LABEL)
    return str(label) if label is not None else ", ".join(
        f"{k}={_short(v)}" for k, v in value.items() if k != GROUP_LABEL)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def trial_index(trial_id: str) -> int:
    """Tune trial ids look like `a1b2c_00003`; the counter numbers trials in creation order."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def trial_run_name(sweep: str, trial_id: str, config: dict[str, Any]) -> str:
    """`<sweep>-<index>-<what varies>`: the trial's run folder and MLflow run name."""
    parts = [re.sub(r"[^A-Za-z0-9.+=_-]+", "", v.replace(" ", "_")) for v in describe_trial(config).values()]
    tail = "-".join(p for p in parts if p)[:80]
    return f"{sweep}-{trial_index(trial_id):03d}" + (f"-{tail}" if tail else "")
