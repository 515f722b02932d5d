"""What a resume may change: the checkpoint's resolved config against the new one.

A checkpoint holds weights for one model trained on one objective. Resuming it with another `model.*` either
fails deep inside `load_state_dict` or, worse, with another `loss.*` it loads fine and silently optimises
something else from then on (a run whose curve changes meaning half-way). So `check_resume_config` refuses
keys that change the model or the objective, naming each `key old -> new` in one line, unless the user allows
them (`--allow-config-change KEY,...`, config `checkpoint.allow_config_change`; `loss.*` allows a section).
Everything else (steps, cadences, tracking, paths, learning rates...) is accepted and listed in one info line,
so the change is on record in the log.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import yaml

from rgan_dist.config import Config
from rgan_dist.errors import UsageError

# Keys that change the model (its shapes, or its state), or the objective being optimised. (dist.strategy is
# not one: a DDP checkpoint resumes in one process; one that cannot load is its own one-line error.)
GUARDED = ("model.*", "loss.*", "train.batch_size", "train.n_dis", "train.ema", "augment.*",
           "schedule.gamma_end")  # augmentation changes what D judges; gamma_end, the penalty's weight
# Never compared: they say how this job starts, not what it trains.
IGNORED = ("checkpoint.resume", "checkpoint.overwrite", "checkpoint.allow_config_change")
# Not a config key: the number of ranks, which sets the batch that global Ra/Rc batch means run over.
WORLD_SIZE = "dist.world_size"


def _uses_global_batch_means(cfg: dict[str, Any]) -> bool:
    """Relativistic average (ra*) and centred (rc*) losses compare with a batch mean; with
    loss.batch_stats=global that mean is over every rank's batch, so the number of ranks is part of the
    objective exactly as train.batch_size is."""
    loss = cfg.get("loss", {})
    return str(loss.get("name", "")).startswith(("ra", "rc")) and loss.get("batch_stats", "global") == "global"


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`section.key -> (old, new)` for every key whose value differs (a key one side lacks counts as a change,
    e.g. a checkpoint written before the key existed: its value there is None)."""
    def flat(cfg: dict[str, Any]) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sec in cfg.items() if isinstance(sec, dict) for k, v in sec.items()}

    a, b = flat(old), flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not _matches(k, IGNORED)}


def _with_defaults(old: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before a key existed trained with that key's default (a key is only ever added with
    the default that keeps the old behaviour), so the missing key is compared as its default, not as None:
    upgrading rgan-dist must not make an old run unresumable."""
    defaults = Config().to_dict()
    return {s: {**defaults.get(s, {}), **sec} if isinstance(sec, dict) else sec
            for s, sec in {**defaults, **old}.items()}


def _matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_allowed_patterns(patterns: list[str], cfg: Config) -> None:
    """Each `--allow-config-change` entry must name a config key or a section wildcard (`loss.*`), so a typo
    cannot silently allow nothing."""
    keys = [*cfg.flat(), WORLD_SIZE]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(k, p) for k in keys):
            raise UsageError(f"checkpoint.allow_config_change: {p!r} matches no config key; give keys such as "
                             f"loss.name, model.width or {WORLD_SIZE}, or a section wildcard such as loss.*")


def check_resume_config(checkpoint_config: str | None, cfg: Config, *, old_world_size: int | None,
                        world_size: int, where: str) -> str | None:
    """Refuse (UsageError, one line) a resume whose config changes guarded keys not allowed by
    `cfg.checkpoint.allow_config_change`; otherwise the info line listing what changed (None: nothing did).

    `checkpoint_config` is the YAML the checkpoint stored (`dump_config`); `where` names the checkpoint."""
    allowed = list(cfg.checkpoint.allow_config_change)
    check_allowed_patterns(allowed, cfg)
    old = yaml.safe_load(checkpoint_config) if checkpoint_config else None
    if not isinstance(old, dict):
        return None  # a checkpoint without its config (none written so far): nothing to compare
    new = cfg.to_dict()
    changes = config_changes(_with_defaults(old), new)
    if old_world_size is not None and old_world_size != world_size:
        changes[WORLD_SIZE] = (old_world_size, world_size)
    guarded = [*GUARDED, WORLD_SIZE] if _uses_global_batch_means(new) else list(GUARDED)
    refused = {k: v for k, v in changes.items() if _matches(k, guarded) and not _matches(k, allowed)}
    if refused:
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise UsageError(f"resuming {where} with a config that changes the model or the objective: {listed}; "
                         f"resume with the checkpoint's values, or pass --allow-config-change "
                         f"{','.join(refused)} to accept the change")
    if not changes:
        return None
    listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    return f"rgan: resuming {where} with config changes: {listed}"
