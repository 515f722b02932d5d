"""Ray Tune sweeps: many loss variants x hyperparameter setups, each trial the ordinary training loop.

A sweep file (`configs/sweeps/*.yaml`, format in `configs/sweeps/smoke.yaml`) names a base training
config, fixed overrides, a search space over dotted config keys, a scheduler and per-trial resources.
`run_sweep` turns it into one Ray Tune run:

- Each trial is the same `Trainer` as `rgan train`, built from base + overrides + the trial's sampled
  values. One process per trial (`resources.workers: 1`, CPU or one GPU), or, with `workers > 1`, a Ray
  Train `TorchTrainer` started inside the trial (Train V2: a plain Tune function builds the
  TorchTrainer; its workers run DDP/DeepSpeed through our strategies, reporting with
  `ray.train.report`, forwarded to Tune by `TuneReportCallback`).
- Trials report at every FID evaluation (`eval.every`): `fid`, `best_fid` and `step` (the scheduler's
  time axis, in generator steps), together with a Ray checkpoint holding our own checkpoint file. A
  failed trial (`max_failures`) and a PBT exploit restart from such a checkpoint through
  `checkpoint.resume`, so model, optimizers, EMA, RNG and data position continue exactly.
- ASHA (early stopping) and PBT (exploit/explore of lr, betas, ...) minimise FID; FIFO runs every trial
  to the end (what reproducing a table needs).
- MLflow: one parent run per sweep; each trial is a nested child run made by the same tracker as a
  single `rgan train` run (same params, metrics, artifacts), so the UI compares variants side by side.
- The sweep survives its driver: `Tuner.restore` continues it (`rgan sweep --resume`), and the MLflow
  parent run id is kept in `<out_dir>/sweep.json`.
- At the end, a table of trials sorted by best FID is printed and written to `<out_dir>/results.md`
  (plus `.csv` and `.json`), with the paper's value beside each trial when the sweep names a paper table.

Paths in the base config (data, DeepSpeed JSON, Inception file) are made absolute on the driver, because
Tune runs each trial in its own working directory and, on a cluster, on another machine.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rgan_dist.config import Config, config_from_dict, dump_config, load_config
from rgan_dist.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from rgan_dist.engine.loop import Trainer

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEDULERS = ("fifo", "asha", "pbt")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "lograndint")
GROUP_LABEL = "label"  # inside a group's mapping: a display name, not a config key
STATE_FILE = "sweep.json"
SWEEP_FAULT_ENV = "RGAN_SWEEP_FAULT_INJECT"
FLUSH_TIMEOUT_S = 120.0  # the longest a trial waits for MLflow before handing a report to Tune
TRIAL_DRIVER_CPUS = 0.01  # the Tune function of a multi-worker trial only waits on its TorchTrainer
# Keys PBT may change on a running trial: anything that keeps parameter shapes, data and bookkeeping.
PBT_MUTABLE_SECTIONS = ("loss", "train")
PBT_IMMUTABLE_KEYS = ("train.steps", "train.seed", "train.batch_size")
PATH_KEYS = ("data.shards", "dist.deepspeed_config", "eval.inception")  # resolved on the driver
TOP_KEYS = ("name", "base", "overrides", "space", "num_samples", "scheduler", "max_concurrent_trials",
            "max_failures", "resources", "out_dir", "storage", "paper")


# ------------------------------------------------------------------------------------------ the spec


@dataclass
class Resources:
    workers: int = 1            # training processes per trial; > 1 runs a Ray Train TorchTrainer
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class SchedulerSpec:
    name: str = "fifo"
    grace_period: int = 0           # ASHA: steps before a trial may be stopped (0: eval.every)
    reduction_factor: float = 2.0   # ASHA
    max_t: int = 0                  # ASHA: steps of a full trial (0: train.steps)
    perturbation_interval: int = 0  # PBT: steps between exploit/explore (0: eval.every)
    mutations: dict[str, Any] = field(default_factory=dict)  # PBT: key -> list or distribution
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    synch: bool = False             # PBT: wait for every trial at each interval (reproducible, slower)


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: Path
    base_config: Config          # base file + fixed overrides, paths absolute
    overrides: dict[str, Any]
    space: dict[str, Any]
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_concurrent_trials: int = 0
    max_failures: int = 2
    resources: Resources = field(default_factory=Resources)
    out_dir: Path = Path("runs/sweeps")
    storage: str = ""
    paper: str = ""

    @property
    def experiment_path(self) -> str:
        """Where Tune keeps the experiment (what `Tuner.restore` reads)."""
        return f"{self.storage.rstrip('/')}/{self.name}" if self.storage else str(self.out_dir)

    @property
    def storage_path(self) -> str:
        return self.storage or str(self.out_dir.parent)

    @property
    def varied_keys(self) -> list[str]:
        return list(self.space) + [k for k in self.scheduler.mutations if k not in self.space]


def find_file(path: str | Path) -> Path:
    """`path` as given, else relative to the source checkout: `ray submit` runs the sweep script on the
    head node from another working directory, where `configs/...` is found next to the package."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.is_file() else p


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _config_keys() -> set[str]:
    return set(Config().flat())


def _apply(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def _checked(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> Config:
    """The config these overrides give, or the config system's own error prefixed with where they came from."""
    try:
        return config_from_dict(_apply(raw, overrides))
    except ConfigError as e:
        raise _err(where, str(e).removeprefix("config: ")) from None


def _absolute_path(value: Any) -> Any:
    """A file path made absolute (relative to the driver's working directory, or to the source checkout
    when only found there), so trials find it from any working directory and node."""
    if not isinstance(value, str) or not value or re.match(r"^[A-Za-z][\w+.-]*:", value) or value.startswith("{"):
        return value  # sklearn:digits, pipe:..., http://..., s3://..., inline JSON
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return os.path.abspath(p)


def _absolute_paths(cfg: Config) -> Config:
    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, _absolute_path(getattr(getattr(cfg, section), name)))
    return cfg


def _absolute_space(space: dict[str, Any]) -> dict[str, Any]:
    """The space with every value of a path key (also inside groups and distributions) made absolute."""

    def fix_entry(key: str, spec: Any) -> Any:
        if "." in key:
            if key not in PATH_KEYS:
                return spec
            if isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec.values())), list):
                kind, values = next(iter(spec.items()))
                return {kind: [_absolute_path(v) for v in values]}
            return _absolute_path(spec)
        if isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec.values())), list):
            kind, values = next(iter(spec.items()))
            return {kind: [{k: (_absolute_path(v) if k in PATH_KEYS else v) for k, v in item.items()}
                           if isinstance(item, dict) else item for item in values]}
        return spec

    return {key: fix_entry(key, spec) for key, spec in space.items()}


def _distribution(spec: Any, where: str) -> tuple[str, Any]:
    """(kind, values) of one space entry: a fixed value, or `{grid|choice: [...]}`, `{uniform|loguniform:
    [lo, hi]}`, `{randint|lograndint: [lo, hi]}` (hi exclusive)."""
    if not isinstance(spec, dict):
        return "fixed", spec
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise _err(where, f"expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{grid: [a, b]}} or "
                          f"{{loguniform: [1.0e-5, 1.0e-3]}}), got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise _err(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint", "lograndint"):
        if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise _err(where, f"{kind} needs [low, high] numbers, got {values!r}")
        lo, hi = values
        if not lo < hi:
            raise _err(where, f"{kind} needs low < high, got {values!r}")
        if kind.startswith("log") and lo <= 0:
            raise _err(where, f"{kind} needs low > 0, got {values!r}")
        if kind.endswith("randint") and not all(float(v).is_integer() for v in values):
            raise _err(where, f"{kind} needs integers, got {values!r}")
    return kind, values


def _candidates(kind: str, values: Any) -> list[Any]:
    """Values that stand for an entry when checking it: every listed value, or a range's two ends."""
    if kind == "fixed":
        return [values]
    if kind in ("grid", "choice"):
        return list(values)
    if kind.endswith("randint"):
        return [int(values[0]), int(values[1]) - 1]
    return list(values)


def _as_overrides(key: str, value: Any) -> dict[str, Any]:
    """One space entry's sampled value as config overrides (a group's mapping is several keys)."""
    if "." in key:
        return {key: value}
    return {k: v for k, v in value.items() if k != GROUP_LABEL}


def _check_space(space: Any, raw: dict[str, Any], where: str) -> None:
    if not isinstance(space, dict) or not space:
        raise _err(where, "space must be a non-empty mapping of config keys (or groups) to values")
    keys = _config_keys()
    grids: list[list[dict[str, Any]]] = []
    for key, spec in space.items():
        at = f"{where}.{key}"
        kind, values = _distribution(spec, at)
        if "." in key:
            if key not in keys:
                raise _err(at, "unknown config key; keys look like loss.name, train.lr_d (see configs/base.yaml)")
        else:
            if kind not in ("grid", "choice"):
                raise _err(at, f"a group (a name without a dot) takes {{grid: [...]}} or {{choice: [...]}} of "
                               f"mappings of config keys, got {spec!r}")
            for item in values:
                if not isinstance(item, dict) or not item:
                    raise _err(at, f"each entry of a group is a mapping of config keys, got {item!r}")
                bad = [k for k in item if k != GROUP_LABEL and k not in keys]
                if bad:
                    raise _err(at, f"unknown config key {bad[0]!r} in {item!r}")
        options = [_as_overrides(key, v) for v in _candidates(kind, values)]
        for option in options:
            _checked(raw, option, at)
        if kind in ("grid", "fixed"):
            grids.append(options)
    combos = math.prod(len(g) for g in grids) if len(grids) > 1 else 0
    if 0 < combos <= 4096:  # contradictions only a combination shows (e.g. cnn32 with resolution 64)
        for combo in itertools.product(*grids):
            merged: dict[str, Any] = {}
            for part in combo:
                merged.update(part)
            _checked(raw, merged, f"{where} (grid combination {merged})")


def _sub(raw: Any, cls: type, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise _err(where, f"expected a mapping, got {raw!r}")
    allowed = cls.__dataclass_fields__
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise _err(where, f"unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    out = cls(**raw)
    for name, f in allowed.items():
        value = getattr(out, name)
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        if typ in ("int", "float") and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise _err(f"{where}.{name}", f"expected a number >= 0, got {value!r}")
        if typ == "int" and not float(value).is_integer():
            raise _err(f"{where}.{name}", f"expected an integer, got {value!r}")
    return out


def _parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`section.key=value` strings (the command line) as values, read as YAML like `rgan train` reads them."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.steps=1000")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, name: str | None = None) -> SweepSpec:
    """Read and check a sweep file. `overrides` (`section.key=value`, the command line) change the base
    config of every trial, over the file's own `overrides`; the space still sets what it varies. Every
    error names the file and the key."""
    p = find_file(path)
    where = f"sweep {str(path)!r}"
    if not p.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise _err(where, f"not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise _err(where, "top level must be a mapping")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise _err(where, f"unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    if "base" not in data or "space" not in data:
        raise _err(where, "needs `base:` (a training config) and `space:` (what varies)")
    sweep_name = name or data.get("name") or p.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(sweep_name)):
        raise _err(where, f"name {sweep_name!r}: use letters, digits, '-', '_' or '.'")
    base = p.parent / str(data["base"])
    fixed = data.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise _err(f"{where}: overrides", "expected a mapping of section.key: value")
    keys = _config_keys()
    command_line = _parse_overrides(overrides)
    for k in [*fixed, *command_line]:
        if k not in keys:
            raise _err(f"{where}: overrides.{k}", "unknown config key (see configs/base.yaml)")
    try:
        cfg = load_config(base)
    except ConfigError as e:
        raise _err(f"{where}: base", str(e)) from None
    cfg = _checked(cfg.to_dict(), {**fixed, **command_line}, f"{where}: overrides")
    cfg = _absolute_paths(cfg)
    raw = cfg.to_dict()
    _check_space(data["space"], raw, f"{where}: space")
    space = _absolute_space(data["space"])

    sched = _sub(data.get("scheduler"), SchedulerSpec, f"{where}: scheduler")
    res = _sub(data.get("resources"), Resources, f"{where}: resources")
    if not isinstance(sched.synch, bool):
        raise _err(f"{where}: scheduler.synch", f"expected true or false, got {sched.synch!r}")
    if not isinstance(sched.mutations, dict):
        raise _err(f"{where}: scheduler.mutations", f"expected a mapping of config keys, got {sched.mutations!r}")
    if sched.name not in SCHEDULERS:
        raise _err(f"{where}: scheduler.name", f"{sched.name!r} not allowed; choose one of {', '.join(SCHEDULERS)}")
    num_samples = data.get("num_samples", 1)
    max_failures = data.get("max_failures", 2)
    max_concurrent = data.get("max_concurrent_trials", 0)
    for key, value in (("num_samples", num_samples), ("max_failures", max_failures),
                       ("max_concurrent_trials", max_concurrent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "num_samples" else 0):
            raise _err(f"{where}: {key}", f"expected an integer >= {1 if key == 'num_samples' else 0}, got {value!r}")
    if res.workers < 1:
        raise _err(f"{where}: resources.workers", "expected >= 1")
    if cfg.eval.every <= 0:
        raise _err(f"{where}: eval.every", "trials report FID to Tune at every evaluation: set eval.every > 0 "
                                           "(e.g. in overrides)")
    if res.workers > 1 and cfg.dist.strategy == "single":
        raise _err(f"{where}: resources.workers={res.workers}", "needs dist.strategy ddp or deepspeed "
                                                                 "(set it in overrides)")
    if res.workers > 1 and sched.name == "pbt":
        raise _err(f"{where}: scheduler.name=pbt", "PBT restarts trials from other trials' checkpoints, which "
                                                   "multi-worker trials do not support: use asha or fifo")
    _check_scheduler(sched, cfg, raw, f"{where}: scheduler")
    paper = str(data.get("paper") or "")
    if paper:
        from rgan_dist.paper_reference import table_names

        if paper not in table_names():
            raise _err(f"{where}: paper", f"{paper!r} unknown; choose one of {', '.join(table_names())}")
    out_dir = Path(str(data.get("out_dir") or "runs/sweeps/{name}").replace("{name}", sweep_name)).expanduser()
    storage = str(data.get("storage") or "")
    if storage and "://" not in storage:
        storage = os.path.abspath(Path(storage).expanduser())
    return SweepSpec(path=p, name=sweep_name, base=base, base_config=cfg, overrides=dict(fixed), space=space,
                     num_samples=num_samples, scheduler=sched, max_concurrent_trials=max_concurrent,
                     max_failures=max_failures, resources=res, out_dir=Path(os.path.abspath(out_dir)),
                     storage=storage, paper=paper)


def _check_scheduler(s: SchedulerSpec, cfg: Config, raw: dict[str, Any], where: str) -> None:
    every, steps = cfg.eval.every, cfg.train.steps
    if s.name == "asha":
        grace = s.grace_period or every
        max_t = s.max_t or steps
        if grace % every:
            raise _err(f"{where}.grace_period", f"{grace} is not a multiple of eval.every={every} (trials report "
                                                f"only when they evaluate)")
        if not grace < max_t:
            raise _err(f"{where}.grace_period", f"{grace} must be below max_t={max_t} steps, or nothing is stopped")
        if s.reduction_factor <= 1:
            raise _err(f"{where}.reduction_factor", f"must be > 1, got {s.reduction_factor}")
    if s.name == "pbt":
        interval = s.perturbation_interval or every
        if interval % every:
            raise _err(f"{where}.perturbation_interval", f"{interval} is not a multiple of eval.every={every}")
        if not s.mutations:
            raise _err(f"{where}.mutations", "PBT needs keys to mutate, e.g. {train.lr_d: {loguniform: [1e-5, 1e-3]}}")
        keys = _config_keys()
        for key, spec in s.mutations.items():
            at = f"{where}.mutations.{key}"
            if key not in keys:
                raise _err(at, "unknown config key")
            if key.split(".")[0] not in PBT_MUTABLE_SECTIONS or key in PBT_IMMUTABLE_KEYS:
                raise _err(at, "PBT can change only loss.* and train.* keys that keep a checkpoint loadable "
                               f"(not {', '.join(PBT_IMMUTABLE_KEYS)})")
            kind, values = _distribution({"choice": spec} if isinstance(spec, list) else spec, at)
            if kind in ("grid", "fixed"):
                raise _err(at, "use a list of values or a distribution (uniform, loguniform, ...)")
            for v in _candidates(kind, values):
                _checked(raw, {key: v}, at)
    elif s.mutations:
        raise _err(f"{where}.mutations", f"only used with name: pbt (got {s.name})")


# ------------------------------------------------------------------------------- Tune's objects


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


def param_space(spec: SweepSpec) -> dict[str, Any]:
    return {key: _domain(*_distribution(value, key)) for key, value in spec.space.items()}


def planned_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """The trials the grid makes (per `num_samples` repeat), in Tune's order (the first grid key varies
    fastest), each as a Tune config; a non-grid entry stays its distribution and is drawn per trial."""
    grid_keys = [k for k, v in spec.space.items() if _distribution(v, k)[0] == "grid"]
    fixed = {k: v for k, v in spec.space.items() if k not in grid_keys}
    values = [_distribution(spec.space[k], k)[1] for k in grid_keys]
    out = []
    for _ in range(spec.num_samples):
        for combo in itertools.product(*reversed(values)):
            out.append({**fixed, **dict(zip(grid_keys, reversed(combo), strict=True))})
    return out


def make_scheduler(spec: SweepSpec) -> Any:
    """The Tune scheduler; its time axis is our `step` (generator steps), reported with every FID."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s, cfg = spec.scheduler, spec.base_config
    if s.name == "asha":
        return ASHAScheduler(time_attr="step", max_t=s.max_t or cfg.train.steps,
                             grace_period=s.grace_period or cfg.eval.every, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        mutations = {k: (v if isinstance(v, list) else _domain(*_distribution(v, k))) for k, v in s.mutations.items()}
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
            out.update(_as_overrides(key, value))
    return out


def describe_trial(config: dict[str, Any]) -> dict[str, str]:
    """What varies in a trial, for tables and tags: a group shows its `label` (or its keys)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            label = value.get(GROUP_LABEL)
            out[key] = str(label) if label is not None else ", ".join(
                f"{k}={_short(v)}" for k, v in value.items() if k != GROUP_LABEL)
        else:
            out[key] = _short(value)
    return out


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


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ------------------------------------------------------------------------------ inside a trial


@dataclass
class TrialSetup:
    """Everything a trial needs besides its sampled values; shipped to trials with `tune.with_parameters`."""

    sweep: str
    base: dict[str, Any]           # the resolved base config (plain dict, absolute paths)
    out_dir: str                   # trial outputs go to <out_dir>/trials/<trial_id>
    mlflow_uri: str = ""           # "" when tracking is off
    experiment: str = ""
    parent_run_id: str | None = None
    paper: str = ""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0
    train_storage: str = ""        # Ray Train runs of multi-worker trials
    fault: str = ""                # RGAN_SWEEP_FAULT_INJECT, read on the driver (test hook)

    def trial_config(self, trial_id: str, config: dict[str, Any], resume: str | None) -> Config:
        """Base < the trial's sampled values (`config`, Tune's) < what every trial must have its own of."""
        overrides = trial_overrides(config)
        out = Path(self.out_dir) / "trials" / trial_id
        plumbing = {
            "run.name": trial_run_name(self.sweep, trial_id, config),
            "run.out_dir": str(out),
            "checkpoint.dir": "",
            "checkpoint.every": 0,        # a trial checkpoints at every FID report instead
            "checkpoint.resume": resume or "",
            "checkpoint.overwrite": True,  # a retry Tune restarts from scratch sets the failed attempt aside
            "train.progress": False,      # Ray's logs are no terminal
            "tracking.enabled": bool(self.mlflow_uri) and self.base["tracking"]["enabled"],
            "tracking.mlflow_uri": self.mlflow_uri,
            "tracking.experiment": self.experiment or self.base["tracking"]["experiment"],
        }
        return config_from_dict(_apply(self.base, {**overrides, **plumbing}), where=f"trial {trial_id}")


class FaultOnce:
    """`RGAN_SWEEP_FAULT_INJECT=raise@K[:trialN]`: raise at the end of step K, once per trial.

    A test hook, not a feature (like the engine's `RGAN_FAULT_INJECT`, which fires on every attempt and so
    cannot show a retried trial completing). "Once" is kept by a marker file in the trial's output folder,
    so the retry that resumes from the trial's checkpoint runs through step K."""

    def __init__(self, spec: str, trial_id: str, out_dir: Path, rank: int = 0) -> None:
        self.step: int | None = None
        self.marker = out_dir / f".fault-{spec.replace('@', '-').replace(':', '-')}.fired"
        if not spec:
            return
        m = re.fullmatch(r"raise@(\d+)(?::trial(\d+))?", spec.strip())
        if not m:
            raise UsageError(f"{SWEEP_FAULT_ENV}={spec!r}: expected raise@STEP[:trialN], e.g. raise@15")
        if rank == 0 and (m.group(2) is None or int(m.group(2)) == trial_index(trial_id)):
            self.step = int(m.group(1))

    def check(self, step: int) -> None:
        if self.step is not None and step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{time.time()}\n")
            raise RuntimeError(f"{SWEEP_FAULT_ENV}: injected failure at step {step}")


class Reporter:
    """Hands each FID evaluation to Tune (or Ray Train), with a Ray checkpoint holding our checkpoint.

    `report_fn(metrics, checkpoint=...)` is `ray.tune.report` in a one-process trial and `ray.train.report`
    in the workers of a multi-worker trial (every worker calls it; rank 0 attaches the checkpoint)."""

    def __init__(self, report_fn: Callable[..., None], checkpoint_cls: Any, *, restored_from: int = 0) -> None:
        self.report_fn = report_fn
        self.checkpoint_cls = checkpoint_cls
        self.restored_from = restored_from
        self.last_step: int | None = None
        self.run_id = ""
        self.before_send: Callable[[Trainer, Path | None], None] | None = None

    def report(self, trainer: Trainer, result: dict[str, float], **extra: Any) -> None:
        path = trainer.save_checkpoint()  # a collective: every rank, same step
        if self.before_send is not None:
            self.before_send(trainer, path)
        fid = float(result.get("fid", math.inf))
        metrics = {"fid": fid, "best_fid": float(trainer.best_fid), "step": int(trainer.step),
                   "restored_from_step": int(self.restored_from), "mlflow_run_id": self.run_id, **extra}
        for key in ("kid", "kid_std", "eval_seconds"):
            if key in result:
                metrics[key] = float(result[key])
        self.last_step = trainer.step
        if path is None:  # not rank 0
            self.report_fn(metrics)
            return
        with _staged(path) as folder:
            self.report_fn(metrics, checkpoint=self.checkpoint_cls.from_directory(str(folder)))


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A folder holding just this checkpoint (its .pt, a DeepSpeed sidecar if any, and a `latest`
    pointer), hard-linked where possible: what Ray copies to its storage as the trial's checkpoint."""
    folder = path.parent / f".ray-{path.stem}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    try:
        link(str(path), str(folder / path.name))
        sidecar = path.with_suffix(".ds")
        if sidecar.is_dir():
            shutil.copytree(sidecar, folder / sidecar.name, copy_function=link)
        (folder / "latest").write_text(path.name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _set_optimizer_hparams(trainer: Trainer) -> None:
    """After a resume, the optimizers carry the checkpoint's lr/betas; a PBT exploit restarts a trial
    from another trial's checkpoint with new values, which must win."""
    t = trainer.cfg.train
    for phase, lr in (("g", t.lr_g), ("d", t.lr_d)):
        trainer.strategy.set_hparams(phase, lr=lr, betas=tuple(t.betas))


class TrialRun:
    """One trial's training: the engine's Trainer with a hook at each evaluation (report to Tune with a
    checkpoint) and after each step (the fault hook); an MLflow child run of the sweep's parent run.

    Built in two phases on purpose: `__init__` loads the checkpoint to resume (while Ray's checkpoint
    folder is still open), `run()` trains."""

    def __init__(self, cfg: Config, setup: TrialSetup, trial_id: str, reporter: Reporter, describe: dict[str, str]
                 ) -> None:
        from rgan_dist.engine import make_strategy
        from rgan_dist.engine.loop import Trainer
        from rgan_dist.tracking import make_tracker, run_tags

        self.cfg, self.setup, self.trial_id, self.reporter = cfg, setup, trial_id, reporter
        self.strategy = make_strategy(cfg)
        s = self.strategy
        fault = FaultOnce(setup.fault, trial_id, cfg.out_dir, s.rank)
        run = self

        class SweepTrainer(Trainer):
            def train_step(self) -> dict[str, Any]:
                out = super().train_step()
                fault.check(self.step)
                return out

            def evaluate(self) -> dict[str, float]:
                result = super().evaluate()
                run.reporter.report(self, result)
                return result

        self.tracker = None
        self.trainer: Trainer | None = None
        try:
            extra = {"rgan.sweep": setup.sweep, "rgan.sweep.trial_id": trial_id,
                     **{f"rgan.sweep.{k}": v for k, v in describe.items()}}
            if setup.parent_run_id:
                extra["mlflow.parentRunId"] = setup.parent_run_id
            if setup.paper:
                extra["rgan.paper_table"] = setup.paper
            tags = run_tags(cfg, strategy=s.name, world_size=s.world_size, device=s.device,
                            extra={**extra, "mlflow.source.name": "rgan sweep"}) if s.is_main else None
            self.tracker = make_tracker(cfg, s.is_main, tags=tags)
            self.reporter.run_id = str(getattr(self.tracker, "run_id", "") or "")
            self.trainer = SweepTrainer(cfg, strategy=s, tracker=self.tracker)
            self.tracker.set_tags({"rgan.model": self.trainer.model_summary})
        except BaseException:
            if self.tracker is not None:
                self.tracker.close("FAILED")
            s.close()
            raise
        self.reporter.restored_from = self.trainer.step
        self.reporter.before_send = self._before_send
        self.finished = False
        if cfg.checkpoint.resume:
            _set_optimizer_hparams(self.trainer)

    def _log_checkpoints(self, final: Path | None) -> None:
        assert self.tracker is not None and self.trainer is not None
        if final is not None:
            self.tracker.log_checkpoint(final, "final")
        self.tracker.log_checkpoint(self.trainer.ckpt.dir / "best.pt", "best")

    def _before_send(self, trainer: Trainer, path: Path | None) -> None:
        """Tune may end this process as soon as it has a report (the last one: the stop criterion; or one a
        scheduler stops the trial at), without waiting for this thread: what the run still owes MLflow
        (the last step's samples and checkpoints, queued metrics) is done before the report leaves."""
        assert self.tracker is not None
        if trainer.step >= self.cfg.train.steps and not self.finished:
            self.finished = True
            if not trainer.samples or not trainer.samples[-1].stem.endswith(f"{trainer.step:07d}"):
                trainer.save_samples()
            self._log_checkpoints(path)
            self.tracker.set_tags({"rgan.sweep.outcome": "completed"})
        flush = getattr(self.tracker, "flush", None)
        if flush is not None:
            flush(FLUSH_TIMEOUT_S)

    def run(self) -> None:
        from rgan_dist.engine.loop import TrainingDiverged

        trainer, tracker = self.trainer, self.tracker
        assert trainer is not None and tracker is not None
        status, outcome = "FAILED", "error"
        try:
            result = trainer.fit()
            if not result.interrupted and self.reporter.last_step != trainer.step:
                trainer.evaluate()  # the final step was not an evaluation step: judge the end too
            if result.interrupted:
                status, outcome = "KILLED", "interrupted"
            else:
                status, outcome = "FINISHED", "completed"
                if not self.finished:
                    self._log_checkpoints(result.checkpoint)
        except TrainingDiverged as e:
            # Deterministic: a retry from the last checkpoint would diverge again. Report it as the worst
            # possible FID (PBT then replaces the trial, ASHA stops it) and end the trial normally.
            outcome = "diverged"
            print(f"rgan sweep: trial {self.trial_id}: {e}", file=sys.stderr, flush=True)
            self.reporter.report(trainer, {"fid": math.inf}, diverged=1)
        except SystemExit as e:
            # `tune.report` ends a trial that Tune stopped with SystemExit(0): at its last step (the stop
            # criterion), or early (ASHA), or paused to restart from another trial's checkpoint (PBT).
            if e.code not in (0, None):
                raise
            status, outcome = "FINISHED", "completed" if self.finished else "stopped early"
            raise
        finally:
            tracker.set_tags({"rgan.sweep.outcome": outcome})
            tracker.close(status)
            self.strategy.close()


def _restore_folder(checkpoint: Any) -> contextlib.AbstractContextManager[str | None]:
    return checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)


def trial_main(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function of every trial."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if setup.workers > 1:
        _run_distributed_trial(config, setup, trial_id)
        return
    with _restore_folder(tune.get_checkpoint()) as folder:
        cfg = setup.trial_config(trial_id, config, folder)
        job = TrialRun(cfg, setup, trial_id, Reporter(tune.report, tune.Checkpoint), describe_trial(config))
    job.run()


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Each Ray Train worker of a multi-worker trial (DDP/DeepSpeed; the process group is Ray's)."""
    import ray.train

    setup: TrialSetup = loop_config["setup"]
    trial_id: str = loop_config["trial_id"]
    config: dict[str, Any] = loop_config["config"]
    with _restore_folder(ray.train.get_checkpoint()) as folder:
        cfg = setup.trial_config(trial_id, config, folder)
        job = TrialRun(cfg, setup, trial_id, Reporter(ray.train.report, ray.train.Checkpoint), describe_trial(config))
    job.run()


def _run_distributed_trial(config: dict[str, Any], setup: TrialSetup, trial_id: str) -> None:
    """A TorchTrainer per trial (Train V2): workers report through `ray.train.report`, and the
    TuneReportCallback forwards rank 0's metrics to this trial. Worker failures are retried by Ray Train
    from its latest checkpoint; a re-run of this function (Tune's own retry) finds the same Train run by
    name and storage and continues it."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": setup.cpus_per_worker}
    if setup.gpus_per_worker:
        resources["GPU"] = setup.gpus_per_worker
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"setup": setup, "trial_id": trial_id, "config": config},
        scaling_config=ray.train.ScalingConfig(num_workers=setup.workers, use_gpu=setup.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=setup.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# ------------------------------------------------------------------------------- MLflow parent


class ParentRun:
    """The sweep's MLflow run; trials nest under it (`mlflow.parentRunId`). Any MLflow failure here
    prints one warning and turns the parent off: the sweep itself must not depend on the tracking store."""

    def __init__(self, spec: SweepSpec, uri: str, artifact_root: str | None, *, resume: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from rgan_dist.tracking import bound_http_retries, experiment_id, git_state, package_versions

        bound_http_retries()
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = spec.base_config.tracking.experiment
        self.state = spec.out_dir / STATE_FILE
        self.experiment_id = exp_id = experiment_id(self.client, self.experiment, artifact_root)
        previous = self._previous() if resume else None
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            tags = {"rgan.sweep": spec.name, "mlflow.source.name": "rgan sweep", "mlflow.source.type": "JOB",
                    "rgan.sweep.scheduler": spec.scheduler.name, **git_state(),
                    **{f"version.{k}": v for k, v in package_versions().items()}}
            if spec.paper:
                tags["rgan.paper_table"] = spec.paper
            self.run_id = self.client.create_run(exp_id, run_name=spec.name, tags=tags).info.run_id
            params = {"sweep.name": spec.name, "sweep.base": str(spec.base), "sweep.scheduler": spec.scheduler.name,
                      "sweep.num_samples": spec.num_samples, "sweep.max_failures": spec.max_failures,
                      "sweep.workers_per_trial": spec.resources.workers,
                      "sweep.space": json.dumps(spec.space, default=str)[:6000],
                      **{f"sweep.overrides.{k}": json.dumps(v) if isinstance(v, list | dict) else v
                         for k, v in spec.overrides.items()}}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                                  synchronous=True)
            self.client.log_artifact(self.run_id, str(spec.path))
            spec.out_dir.mkdir(parents=True, exist_ok=True)
            base = spec.out_dir / "base_config.yaml"
            base.write_text(dump_config(spec.base_config))
            self.client.log_artifact(self.run_id, str(base))
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps({"tracking_uri": uri, "parent_run_id": self.run_id,
                                          "experiment_id": exp_id}) + "\n")
        print(f"rgan sweep: MLflow parent run {self.run_id} in experiment {self.experiment!r} ({uri})", flush=True)

    def _previous(self) -> str | None:
        try:
            record = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None
        if record.get("tracking_uri") != self.uri:
            return None
        try:
            run = self.client.get_run(record["parent_run_id"])
        except Exception:
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def children(self) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
                                       max_results=10_000)

    def finish(self, rows: list[TrialRow], files: list[Path], status: str) -> None:
        """Tag each child with its outcome, close children a killed process left RUNNING, log the table."""
        by_trial = {r.trial_id: r for r in rows}
        for child in self.children():
            row = by_trial.get(child.data.tags.get("rgan.sweep.trial_id", ""))
            if row is not None:
                self.client.set_tag(child.info.run_id, "rgan.sweep.outcome", row.outcome)
                self.client.set_tag(child.info.run_id, "rgan.sweep.rank", str(row.rank))
            if child.info.status == "RUNNING":
                # Its process ended before it could close the run: Tune ends a stopped trial's actor
                # without waiting for it, and a killed driver takes its trials along.
                done = row is not None and row.outcome in ("completed", "stopped early")
                self.client.set_terminated(child.info.run_id, "FINISHED" if done else "KILLED")
        finite = [r.best_fid for r in rows if r.best_fid is not None and math.isfinite(r.best_fid)]
        if finite:
            self.client.log_metric(self.run_id, "best_fid", min(finite))
            best = min((r for r in rows if r.best_fid in finite), key=lambda r: r.best_fid)
            self.client.set_tag(self.run_id, "rgan.sweep.best_trial", best.trial_id)
            self.client.set_tag(self.run_id, "rgan.sweep.best_run", best.name)
        self.client.log_metric(self.run_id, "trials", len(rows))
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)


# ---------------------------------------------------------------------------------- the results


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


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if not math.isnan(f) else None


def collect_rows(results: Any, spec: SweepSpec) -> list[TrialRow]:
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
                             mlflow_run_id=str(m.get("mlflow_run_id") or ""),
                             paper_fid=cell.text() if cell else "", error=error))
    rows.sort(key=lambda x: (x.best_fid is None, x.best_fid if x.best_fid is not None else 0.0, x.trial_id))
    for i, row in enumerate(rows, 1):
        row.rank = i
    return rows


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
        cells = [str(r.rank), r.name, *(r.params.get(k, "") for k in keys), _fmt(r.best_fid), _fmt(r.final_fid),
                 str(r.step), outcome] + ([r.paper_fid or "–"] if paper else [])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[TrialRow], spec: SweepSpec) -> tuple[str, list[Path]]:
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
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    md = spec.out_dir / "results.md"
    md.write_text("\n".join(text) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "trial_id", "run_name", *keys, "best_fid", "final_fid", "step", "outcome",
                     "restored_from_step", "mlflow_run_id", "paper_fid", "error"])
    for r in rows:
        writer.writerow([r.rank, r.trial_id, r.name, *(r.params.get(k, "") for k in keys), r.best_fid, r.final_fid,
                         r.step, r.outcome, r.restored_from_step, r.mlflow_run_id, r.paper_fid, r.error])
    csv_path = spec.out_dir / "results.csv"
    csv_path.write_text(buf.getvalue())
    js = spec.out_dir / "results.json"
    js.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str) + "\n")
    return table, [md, csv_path, js]


# ----------------------------------------------------------------------------------- the driver


@dataclass
class SweepResult:
    rows: list[TrialRow]
    table: str
    files: list[Path]
    experiment_path: str
    parent_run_id: str | None
    results: Any = None  # Tune's ResultGrid


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus)


def _cluster_uri(uri: str) -> str:
    """On a cluster, trials run on other nodes: an MLflow server named `localhost` is this (the head) node,
    so they get its address instead; a SQLite file is local to each node, which splits the sweep's runs."""
    import ray

    m = re.match(r"^(https?://)(localhost|127\.0\.0\.1)(?=[:/]|$)(.*)$", uri)
    if m:
        return f"{m.group(1)}{ray.util.get_node_ip_address()}{m.group(3)}"
    if uri.startswith("sqlite:"):
        print(f"rgan sweep: warning: MLflow store {uri} is a file on this node; trials on other nodes cannot log "
              f"to it. Start an MLflow server (the cluster YAMLs do, on port 5000) and pass "
              f"tracking.mlflow_uri=http://localhost:5000", file=sys.stderr, flush=True)
    return uri


def run_sweep(spec: SweepSpec, *, address: str | None = None, num_cpus: int | None = None, resume: bool = False,
              verbose: int = 1) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep and write its table. Uses the Ray instance this process
    is already connected to, else connects to `address` (`auto`: the cluster this node belongs to), else
    starts a local one with `num_cpus`."""
    from ray import tune

    from rgan_dist.tracking import resolve_store

    exp_path = spec.experiment_path
    _init_ray(address, num_cpus)
    if address and not spec.storage:
        print(f"rgan sweep: warning: the sweep file sets no `storage:`; on a multi-node cluster trial checkpoints "
              f"then stay on the node that wrote them ({exp_path}), so a trial restarted elsewhere, and --resume, "
              f"cannot find them. Set storage: s3://BUCKET/rgan-sweeps or a folder every node mounts.",
              file=sys.stderr, flush=True)
    can_restore = tune.Tuner.can_restore(exp_path)
    if resume and not can_restore:
        raise UsageError(f"rgan sweep --resume: no sweep to continue at {exp_path}; run it without --resume")
    if not resume and can_restore:
        raise UsageError(f"sweep {spec.name!r} already ran in {exp_path}: pass --resume to continue it, or give "
                         f"it another name (--name) to start afresh")
    cfg = spec.base_config
    parent: ParentRun | None = None
    uri = ""
    if cfg.tracking.enabled:
        uri, artifacts = resolve_store(cfg.tracking.mlflow_uri)
        if address:
            uri = _cluster_uri(uri)
        try:
            parent = ParentRun(spec, uri, artifacts, resume=resume)
        except Exception as e:  # tracking must never stop a sweep
            print(f"rgan sweep: warning: MLflow at {uri} failed ({type(e).__name__}: {e}); trials still log to "
                  f"their metrics.jsonl", file=sys.stderr, flush=True)
    res = spec.resources
    setup = TrialSetup(sweep=spec.name, base=cfg.to_dict(), out_dir=str(spec.out_dir), mlflow_uri=uri,
                       experiment=cfg.tracking.experiment, parent_run_id=parent.run_id if parent else None,
                       paper=spec.paper, workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                       gpus_per_worker=res.gpus_per_worker, max_failures=spec.max_failures,
                       train_storage=f"{exp_path.rstrip('/')}/train",
                       fault=os.environ.get(SWEEP_FAULT_ENV, ""))
    if res.workers > 1:
        # The trial function only drives a TorchTrainer, whose workers hold the resources (Ray refuses a
        # request of nothing at all, hence a sliver of a CPU).
        trial_resources: dict[str, float] = {"cpu": TRIAL_DRIVER_CPUS}
    else:
        trial_resources = {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}
    trainable = tune.with_resources(tune.with_parameters(trial_main, setup=setup), trial_resources)
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric="fid", mode="min", scheduler=make_scheduler(spec),
                                        num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent_trials or None,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name if spec.storage else spec.out_dir.name, storage_path=spec.storage_path,
                # A trial's last report ends it before any scheduler sees it (PBT would otherwise still
                # exploit at the final step, and ASHA stops everything at max_t anyway).
                stop={"step": cfg.train.steps},
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # PBT restores trials from other trials' checkpoints, possibly after those reported again:
                # keep them all there; elsewhere a trial only ever resumes from its own latest.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if spec.scheduler.name == "pbt" else 2),
                verbose=verbose),
        )
    status = "FAILED"
    results = None
    rows: list[TrialRow] = []
    files: list[Path] = []
    table = ""
    try:
        results = tuner.fit()
        rows = collect_rows(results, spec)
        table, files = write_results(rows, spec)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            try:
                parent.finish(rows, files, status)
            except Exception as e:
                print(f"rgan sweep: warning: could not finish the MLflow parent run ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
    return SweepResult(rows=rows, table=table, files=files, experiment_path=exp_path,
                       parent_run_id=parent.run_id if parent else None, results=results)
