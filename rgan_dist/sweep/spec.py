"""The sweep file: a typed config section (`SweepConfig`), read and checked by the training config's own
machinery (`rgan_dist.config`) before Ray starts.

There is one config language. The sweep's settings are `_f` fields filled by `config.fill_section`, so a
wrong type, value or unknown key fails exactly as in a training config; fixed overrides, every value of
the search space and every PBT mutation are set on the base config with `config_from_dict(values=...)`,
so an unknown key or a bad value is config.py's own one-line error, prefixed with where in the sweep file
it stands. What stays here is what only a sweep has: the shape of the space and cross-checks between the
sweep's settings and the training config.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgan_dist.config import Config, _f, config_from_dict, fill_section, load_config, parse_overrides
from rgan_dist.errors import ConfigError, UsageError
from rgan_dist.sweep.space import as_overrides, candidates, distribution, error_at

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SCHEDULERS = ("fifo", "asha", "pbt")
# Keys PBT may change on a running trial: anything that keeps parameter shapes, data and bookkeeping.
PBT_MUTABLE_SECTIONS = ("loss", "train")
PBT_IMMUTABLE_KEYS = ("train.steps", "train.seed", "train.batch_size")
PATH_KEYS = ("data.shards", "dist.deepspeed_config", "eval.inception")  # resolved on the driver (see load_sweep)
DEFAULT_OUT_DIR = "runs/sweeps/{name}"


@dataclass
class ResourcesConfig:
    workers: int = _f(1, "Training processes per trial; > 1 runs a Ray Train TorchTrainer (dist.strategy "
                         "ddp or deepspeed).", min=1)
    cpus_per_worker: float = _f(1.0, "CPUs per training process.", min=0.0)
    gpus_per_worker: float = _f(0.0, "GPUs per training process.", min=0.0)


@dataclass
class SchedulerConfig:
    name: str = _f("fifo", "fifo (every trial to the end), asha (stop bad trials early) or pbt.", choices=SCHEDULERS)
    grace_period: int = _f(0, "ASHA: steps before a trial may be stopped (0: eval.every).", min=0)
    reduction_factor: float = _f(2.0, "ASHA: keep 1/reduction_factor of the trials at each rung.", min_exclusive=1.0)
    max_t: int = _f(0, "ASHA: steps of a full trial (0: train.steps).", min=0)
    perturbation_interval: int = _f(0, "PBT: steps between exploit/explore (0: eval.every).", min=0)
    mutations: dict[str, Any] = _f({}, "PBT: config key -> list of values or a distribution ({loguniform: [lo, hi]}).")
    quantile_fraction: float = _f(0.25, "PBT: fraction of trials that exploit / are exploited.", min=0.0, max=0.5)
    resample_probability: float = _f(0.25, "PBT: chance a mutation resamples instead of perturbing.", min=0.0,
                                     max=1.0)
    synch: bool = _f(False, "PBT: every trial waits at each interval (reproducible, slower).")


@dataclass
class SweepConfig:
    """A sweep file (format: configs/sweeps/smoke.yaml). After `load_sweep`: checked, `name` set, paths
    (base, out_dir, storage, path values in the space) absolute, and `base_config` the trials' common config."""

    name: str = _f("", "The sweep's name: Ray experiment, MLflow parent run, output folder (default: file name).")
    base: str = _f("", "The training config every trial starts from (relative to this file). Required.")
    overrides: dict[str, Any] = _f({}, "Fixed `section.key: value` changes to the base, for every trial.")
    space: dict[str, Any] = _f({}, "What varies: config keys (or groups of them) to values or distributions. Required.")
    num_samples: int = _f(1, "Repeats of the grid (random keys are drawn anew each time).", min=1)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = _f(0, "Trials at once (0: as many as the resources allow).", min=0)
    max_failures: int = _f(2, "Retries of a failed trial, each from its last checkpoint.", min=0)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    out_dir: str = _f(DEFAULT_OUT_DIR, "Trial outputs, the Ray experiment and results.{md,csv,json} (default: "
                                       "<storage>/{name} when storage is a folder).")
    storage: str = _f("", "Ray storage for the experiment and trial checkpoints (a folder every node mounts, or "
                          "s3://...); default: out_dir's parent. Required on a cluster (--address).")
    paper: str = _f("", "A table of configs/paper/reference_fid.toml to print beside ours (cifar10, cat, ...).")
    data_root: str = _f("", "The folder relative data.shards paths are under (default: the working directory); on "
                            "a cluster, one every node mounts at that path (data_root=/mnt/shared).")
    # Set by `load_sweep`, never by the file:
    path: Path = field(default=Path(), init=False)
    base_config: Config = field(default_factory=Config, init=False)  # base + fixed overrides, paths absolute
    cluster: bool = field(default=False, init=False)  # read for a cluster: relative paths resolve on each node

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    @property
    def experiment_path(self) -> str:
        """Where Tune keeps the experiment (what `Tuner.restore` reads)."""
        return f"{self.storage.rstrip('/')}/{self.name}" if self.storage else self.out_dir

    @property
    def storage_path(self) -> str:
        return self.storage or str(self.out_path.parent)

    @property
    def shared_folder(self) -> str:
        """`storage` when it is a folder (every node mounts it), else "" (none, or an object store)."""
        return self.storage if self.storage and "://" not in self.storage else ""

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


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """config.py's errors name the key and the value; this puts the sweep file (and the part of it) in front."""
    try:
        yield
    except ConfigError as e:
        raise error_at(where, str(e).removeprefix("config: ")) from None


def _checked(cfg: Config, values: dict[str, Any], where: str) -> Config:
    """`cfg` with `values` (`section.key -> value`) set, checked by the config system."""
    with _at(where):
        return config_from_dict(cfg.to_dict(as_given=True), values=values)


def _split_overrides(items: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The command line's `key=value`s as (the sweep's own settings: keys without a dot, like `storage=...`;
    the training config's `section.key`s). Values are read as YAML by the one override parser."""
    settings = [i for i in items if "." not in i.partition("=")[0]]
    training = [i for i in items if i not in settings]
    return ({k.removeprefix("sweep."): v for k, v in parse_overrides([f"sweep.{i}" for i in settings]).items()},
            parse_overrides(training))


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, name: str | None = None,
               cluster: bool = False) -> SweepConfig:
    """Read and check a sweep file. `overrides` (`key=value`, the command line) win over the file: a key
    without a dot is a sweep setting (`storage=/mnt/shared/sweeps`), a `section.key` changes the base config
    of every trial, over the file's `overrides` and over the space (a key the space varies is then taken
    out of it: the command line is how a cluster's data location reaches every trial).

    `cluster` (the sweep runs on a Ray cluster, `--address`): `storage` is required, and paths are not
    resolved on this machine: a relative `data.shards` is an error (the data must be on shared storage or a
    URL), other relative paths are resolved by each trial against the code it runs (the shipped checkout).
    Every error is one line naming the file and the key."""
    p = find_file(path)
    where = f"sweep {str(path)!r}"
    if not p.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error_at(where, f"not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise error_at(where, "top level must be a mapping")
    settings, training = _split_overrides(overrides)
    spec = SweepConfig()
    with _at(where):
        fill_section(spec, data, "config")
    with _at(f"{where}: command line"):
        fill_section(spec, settings, "config")
    if not spec.base or not spec.space:
        raise error_at(where, "needs `base:` (a training config) and `space:` (what varies)")
    spec.name = name or spec.name or p.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.name):
        raise error_at(where, f"name {spec.name!r}: use letters, digits, '-', '_' or '.'")
    spec.path = p
    spec.cluster = cluster
    spec.base = str(p.parent / spec.base)
    with _at(f"{where}: base"):
        cfg = load_config(spec.base)
    with _at(f"{where}: overrides"):
        cfg = config_from_dict(cfg.to_dict(as_given=True), values={**spec.overrides, **training})
    if spec.data_root and "://" not in spec.data_root:
        spec.data_root = os.path.abspath(Path(spec.data_root).expanduser())
    cfg = spec.base_config = _resolve_paths(cfg, cluster, spec.data_root, where)
    space = _without_keys(spec.space, set(training))
    _check_space(space, cfg, f"{where}: space")
    spec.space = _absolute_space(space, cluster, spec.data_root, f"{where}: space")
    _check_against_training(spec, cfg, where)
    if spec.storage and "://" not in spec.storage:
        spec.storage = os.path.abspath(Path(spec.storage).expanduser())
    if cluster and not spec.storage:
        raise UsageError(cluster_storage_error(spec.path))
    if spec.shared_folder and spec.out_dir == DEFAULT_OUT_DIR:
        spec.out_dir = f"{spec.shared_folder}/{{name}}"  # trial outputs and the table beside Ray's experiment
    spec.out_dir = os.path.abspath(Path(spec.out_dir.replace("{name}", spec.name)).expanduser())
    return spec


def cluster_storage_error(path: str | Path) -> str:
    return (f"rgan sweep --address: sweep {str(path)!r} sets no storage; on a cluster trials run on other nodes, "
            f"so checkpoints, outputs and the results table need storage every node reaches: add "
            f"storage=/mnt/shared/sweeps (a folder every node mounts) or storage=s3://BUCKET/sweeps")


def _without_keys(space: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """The space without `keys` (set on the command line, which wins): dotted entries dropped, and the keys
    taken out of each mapping of a group."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if key in keys:
            continue
        if "." not in key and isinstance(spec, dict) and len(spec) == 1:
            kind, values = next(iter(spec.items()))
            if isinstance(values, list):
                spec = {kind: [{k: v for k, v in item.items() if k not in keys} if isinstance(item, dict) else item
                               for item in values]}
        out[key] = spec
    return out


def _check_against_training(spec: SweepConfig, cfg: Config, where: str) -> None:
    """What the sweep's settings need of the training config, and of each other."""
    res, sched = spec.resources, spec.scheduler
    if cfg.eval.every <= 0:
        raise error_at(f"{where}: eval.every", "trials report FID to Tune at every evaluation: set eval.every > 0 "
                                           "(e.g. in overrides)")
    if res.workers > 1 and cfg.dist.strategy == "single":
        raise error_at(f"{where}: resources.workers={res.workers}", "needs dist.strategy ddp or deepspeed "
                                                                 "(set it in overrides)")
    if res.workers > 1 and sched.name == "pbt":
        raise error_at(f"{where}: scheduler.name=pbt", "PBT restarts trials from other trials' checkpoints, which "
                                                   "multi-worker trials do not support: use asha or fifo")
    _check_scheduler(sched, cfg, f"{where}: scheduler")
    if spec.paper:
        from rgan_dist.paper_reference import table_names

        if spec.paper not in table_names():
            raise error_at(f"{where}: paper", f"{spec.paper!r} unknown; choose one of {', '.join(table_names())}")


def _is_url(value: Any) -> bool:
    """sklearn:digits, pipe:..., http://..., s3://..., inline JSON: nothing to resolve."""
    return not isinstance(value, str) or not value or bool(re.match(r"^[A-Za-z][\w+.-]*:", value)) \
        or value.startswith("{")


def _absolute_path(value: Any) -> Any:
    """A file path made absolute (relative to the working directory, or to the source checkout when only
    found there), so trials find it from any working directory: on the driver for a local sweep, and in
    each trial (against the checkout it runs, see `resolve_trial_paths`) for a cluster sweep."""
    if _is_url(value):
        return value
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return os.path.abspath(p)


def _cluster_path(key: str, value: Any, at: str) -> Any:
    """On a cluster a path is read on the trial's node: a relative data location names nothing there."""
    if key == "data.shards" and not _is_url(value) and not Path(value).expanduser().is_absolute():
        raise error_at(at, f"{value!r} is relative to this machine, but on a cluster every trial's node reads the "
                       f"shards: name the folder every node mounts them under (data_root=/mnt/shared on the "
                       f"command line), or give data.shards=/mnt/shared/data/NAME or a URL (s3://BUCKET/NAME)")
    return value


def _resolve(key: str, value: Any, cluster: bool, data_root: str, at: str) -> Any:
    if key == "data.shards" and data_root and not _is_url(value) and not Path(value).expanduser().is_absolute():
        value = f"{data_root.rstrip('/')}/{value}"
    return _cluster_path(key, value, at) if cluster else _absolute_path(value)


def _resolve_paths(cfg: Config, cluster: bool, data_root: str, where: str) -> Config:
    flat = cfg.flat()
    return config_from_dict(cfg.to_dict(as_given=True), values={
        key: _resolve(key, flat[key], cluster, data_root, f"{where}: {key}") for key in PATH_KEYS})


def resolve_trial_paths(cfg: Config) -> Config:
    """In the trial: paths still relative (a cluster sweep) resolved on this node, against its checkout."""
    flat = cfg.flat()
    return config_from_dict(cfg.to_dict(as_given=True), values={key: _absolute_path(flat[key]) for key in PATH_KEYS})


def _absolute_space(space: dict[str, Any], cluster: bool, data_root: str, where: str) -> dict[str, Any]:
    """The space with every value of a path key (also inside groups and distributions) resolved."""

    def fix(key: str, value: Any) -> Any:
        return _resolve(key, value, cluster, data_root, f"{where}.{key}")

    def fix_entry(key: str, spec: Any) -> Any:
        if "." in key:
            if key not in PATH_KEYS:
                return spec
            if isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec.values())), list):
                kind, values = next(iter(spec.items()))
                return {kind: [fix(key, v) for v in values]}
            return fix(key, spec)
        if isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec.values())), list):
            kind, values = next(iter(spec.items()))
            return {kind: [{k: (fix(k, v) if k in PATH_KEYS else v) for k, v in item.items()}
                           if isinstance(item, dict) else item for item in values]}
        return spec

    return {key: fix_entry(key, spec) for key, spec in space.items()}


def _check_space(space: dict[str, Any], cfg: Config, where: str) -> None:
    """Each entry's shape, every value it can take (a range: both ends) on the base, and every grid
    combination: all through the config system, so a bad key or value fails here, not in a trial."""
    grids: list[list[dict[str, Any]]] = []
    for key, spec in space.items():
        at = f"{where}.{key}"
        kind, values = distribution(spec, at)
        if "." not in key:
            if kind not in ("grid", "choice"):
                raise error_at(at, f"a group (a name without a dot) takes {{grid: [...]}} or {{choice: [...]}} of "
                               f"mappings of config keys, got {spec!r}")
            for item in values:
                if not isinstance(item, dict) or not item:
                    raise error_at(at, f"each entry of a group is a mapping of config keys, got {item!r}")
        options = [as_overrides(key, v) for v in candidates(kind, values)]
        for option in options:
            _checked(cfg, option, at)
        if kind in ("grid", "fixed"):
            grids.append(options)
    combos = math.prod(len(g) for g in grids) if len(grids) > 1 else 0
    if 0 < combos <= 4096:  # contradictions only a combination shows (e.g. cnn32 with resolution 64)
        for combo in itertools.product(*grids):
            merged: dict[str, Any] = {}
            for part in combo:
                merged.update(part)
            _checked(cfg, merged, f"{where} (grid combination {merged})")


def _check_scheduler(s: SchedulerConfig, cfg: Config, where: str) -> None:
    every, steps = cfg.eval.every, cfg.train.steps
    if s.name == "asha":
        grace = s.grace_period or every
        max_t = s.max_t or steps
        if grace % every:
            raise error_at(f"{where}.grace_period", f"{grace} is not a multiple of eval.every={every} (trials report "
                                                f"only when they evaluate)")
        if not grace < max_t:
            raise error_at(f"{where}.grace_period", f"{grace} must be below max_t={max_t} steps, or nothing is stopped")
    if s.name == "pbt":
        interval = s.perturbation_interval or every
        if interval % every:
            raise error_at(f"{where}.perturbation_interval", f"{interval} is not a multiple of eval.every={every}")
        if not s.mutations:
            raise error_at(f"{where}.mutations",
                           "PBT needs keys to mutate, e.g. {train.lr_d: {loguniform: [1e-5, 1e-3]}}")
        for key, spec in s.mutations.items():
            at = f"{where}.mutations.{key}"
            kind, values = distribution({"choice": spec} if isinstance(spec, list) else spec, at)
            if kind in ("grid", "fixed"):
                raise error_at(at, "use a list of values or a distribution (uniform, loguniform, ...)")
            for v in candidates(kind, values):
                _checked(cfg, {key: v}, at)
            if key.split(".")[0] not in PBT_MUTABLE_SECTIONS or key in PBT_IMMUTABLE_KEYS:
                raise error_at(at, "PBT can change only loss.* and train.* keys that keep a checkpoint loadable "
                               f"(not {', '.join(PBT_IMMUTABLE_KEYS)})")
    elif s.mutations:
        raise error_at(f"{where}.mutations", f"only used with name: pbt (got {s.name})")
