"""The sweep file: what it may say, checked against the training config before Ray starts."""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgan_dist.config import Config, config_from_dict, load_config
from rgan_dist.errors import ConfigError, UsageError
from rgan_dist.sweep.space import GROUP_LABEL, _as_overrides, _candidates, _distribution, _err

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SCHEDULERS = ("fifo", "asha", "pbt")
# Keys PBT may change on a running trial: anything that keeps parameter shapes, data and bookkeeping.
PBT_MUTABLE_SECTIONS = ("loss", "train")
PBT_IMMUTABLE_KEYS = ("train.steps", "train.seed", "train.batch_size")
PATH_KEYS = ("data.shards", "dist.deepspeed_config", "eval.inception")  # resolved on the driver
TOP_KEYS = ("name", "base", "overrides", "space", "num_samples", "scheduler", "max_concurrent_trials",
            "max_failures", "resources", "out_dir", "storage", "paper")



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
