"""A recipe variant's settings: the method a recipe file (configs/recipes/) defines, as overrides on top of
the benchmark config, so the recipe is defined once, in its YAML, and the benchmark measures exactly what a
user gets from `rgan train --config <recipe>`.

The method is the recipe's model, loss, optimiser, EMA, augmentation and schedules. The benchmark keeps what
makes runs comparable: the workload's data, resolution and metric, the run's device and thread, no rolling
checkpoints, and the budget clock instead of `train.steps`. Every method value the benchmark config (with
the workload's and profile's overrides) does not already have becomes an override, so a run's stored
settings hold the recipe's values: a results file made with an older recipe is refused on resume instead of
mixing two recipes in one table."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import yaml

from benchmarks.ttq.profiles import CONFIG, REPO

METHOD_SECTIONS = ("model", "loss", "train", "augment", "schedule")
# Method sections' keys that belong to the benchmark, not to the recipe: the workload's resolution, the seed,
# stopping (the budget, not a step count), logging and sample grids.
HARNESS_KEYS = frozenset({"model.resolution", "train.steps", "train.seed", "train.max_bad_steps", "train.log_every",
                          "train.sample_every", "train.sample_grid", "train.progress"})


def override_value(value: Any) -> str:
    """A config value as the text of a `key=value` override that reads back (YAML) as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text  # YAML 1.1 needs the dot: 5.0e-05
    if isinstance(value, list | tuple):
        return "[" + ", ".join(override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value and yaml.safe_load(value) == value and "," not in value else json.dumps(value)
    return str(value)


def recipe_for(recipe: str, resolution: int) -> str:
    """The file of `recipe`'s family for `resolution`: a recipe's widths are per stage, so each resolution it
    is measured at has its own file, `<stem>_<resolution>.yaml` beside it (configs/recipes/small_data.yaml is
    the 64x64 small-data recipe, small_data_32.yaml its 32x32 form); `recipe` itself when no such file exists
    (`recipe_overrides` then refuses a resolution it was not written for)."""
    base = REPO / recipe
    sibling = base.with_name(f"{base.stem}_{resolution}{base.suffix}")
    return str(sibling.relative_to(REPO)) if sibling.is_file() else recipe


@functools.lru_cache(maxsize=64)
def recipe_overrides(recipe: str, start: tuple[str, ...]) -> tuple[str, ...]:
    """The overrides that turn the benchmark config + `start` (the workload's and profile's overrides) into
    `recipe`'s method; the recipe's own resolution must equal the workload's (its widths are per stage)."""
    from rgan_dist.config import load_config

    path = REPO / recipe
    if not path.is_file():
        raise ValueError(f"recipe {recipe}: no such file (the recipe variants start from configs/recipes/)")
    mine, theirs = load_config(CONFIG, list(start)).flat(), load_config(path).flat()
    if mine["model.resolution"] != theirs["model.resolution"]:
        raise ValueError(f"recipe {recipe} is a {theirs['model.resolution']}x{theirs['model.resolution']} recipe; this "
                         f"workload runs at {mine['model.resolution']} (--resolution {theirs['model.resolution']}, or "
                         f"write its {mine['model.resolution']}x{mine['model.resolution']} form as "
                         f"{path.stem}_{mine['model.resolution']}.yaml beside it)")
    return tuple(f"{k}={override_value(v)}" for k, v in theirs.items()
                 if k.split(".")[0] in METHOD_SECTIONS and k not in HARNESS_KEYS and v != mine.get(k))
