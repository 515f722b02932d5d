"""The DeepSpeed config one engine runs with: `dist.deepspeed_config` (a JSON file or inline `{...}`)
checked against the rgan config and completed from it. Pure (no torch, no DeepSpeed), so `rgan_dist.config`
runs it at load and a bad JSON fails before any process starts; `rgan_dist.engine.deepspeed` hands the
result to `deepspeed.initialize`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Protocol

from rgan_dist.errors import ConfigError


class Settings(Protocol):
    """What is read here of an `rgan_dist.config.Config` (`dist.deepspeed_config`, `train.batch_size`,
    `lr_g`, `lr_d`, `betas`), named by shape so that config, which calls this module, is not imported back."""

    @property
    def dist(self) -> Any: ...

    @property
    def train(self) -> Any: ...


# Keys the strategy owns: it derives them from the rgan config, and a JSON that sets them differently
# would silently change the training (batch, precision, optimizer) behind the config's back. A section is
# accepted when it only says "auto" (or restates ours), as Hugging Face/Accelerate configs do.
_REFUSED = {
    "optimizer": "the optimizer is the project's Adam (train.lr_g/lr_d/betas); remove 'optimizer' or set its "
                 "params lr and betas to \"auto\"",
    "scheduler": "learning-rate schedules are not supported; remove 'scheduler' or set all its params to \"auto\"",
    "bf16": "set train.precision=bf16 instead (autocast over fp32 weights); remove 'bf16' or set enabled \"auto\"",
    "fp16": "fp16 is not supported with DeepSpeed here; use train.precision=bf16 and remove 'fp16' (or set "
            "enabled \"auto\")",
    "amp": "use train.precision=bf16 instead of 'amp'",
    "torch_autocast": "set train.precision=bf16 instead of 'torch_autocast'",
}
AUTO = "auto"
# Adam's settings as `_optimizers` builds them (torch's defaults past lr and betas).
_ADAM_DEFAULTS = {"eps": 1e-8, "weight_decay": 0.0}


def _owned_sections(user: dict[str, Any], cfg: Settings, where: str) -> None:
    """Check, then drop, the sections whose content rgan-dist decides: accepted only where they say "auto" or
    what the config already says (a copied HF/Accelerate template), refused where they contradict it."""
    for key in ("bf16", "fp16", "amp", "torch_autocast"):
        if key in user:
            sec = user.pop(key)
            # "auto" is filled as off: bf16 is autocast over fp32 weights (train.precision), never DeepSpeed's.
            if not isinstance(sec, dict) or sec.get("enabled", False) not in (AUTO, False):
                raise ConfigError(f"{where}: '{key}' is decided by rgan-dist: {_REFUSED[key]}")
    if "scheduler" in user:
        sec = user.pop("scheduler")
        params = sec.get("params", {}) if isinstance(sec, dict) else None
        # WarmupLR with every value "auto" is filled as no warm-up: the constant rate the other strategies use.
        if not (isinstance(sec, dict) and sec.get("type") == "WarmupLR" and isinstance(params, dict)
                and all(v == AUTO for v in params.values())):
            raise ConfigError(f"{where}: 'scheduler' is decided by rgan-dist: {_REFUSED['scheduler']}")
    if "optimizer" in user:
        sec = user.pop("optimizer")
        params = sec.get("params") if isinstance(sec, dict) else None
        if (not isinstance(params, dict) or str(sec.get("type", "")).lower() not in ("adam", "adamw")
                or "lr" not in params or "betas" not in params):
            raise ConfigError(f"{where}: 'optimizer' is decided by rgan-dist: {_REFUSED['optimizer']}")
        t = cfg.train
        ours: dict[str, tuple[Any, str]] = {
            "lr": (t.lr_g if t.lr_g == t.lr_d else None, f"train.lr_g={t.lr_g}, train.lr_d={t.lr_d}"),
            "betas": (list(t.betas), f"train.betas={list(t.betas)}"),
            **{k: (v, f"the project's Adam {k}={v}") for k, v in _ADAM_DEFAULTS.items()},
        }
        for name, value in params.items():
            if name not in ours:
                raise ConfigError(f"{where}: optimizer.params.{name} is not supported (the optimizer is the project's "
                                  "torch Adam); remove it")
            want, source = ours[name]
            if value != AUTO and (want is None or not _same_number(value, want)):
                raise ConfigError(f"{where}: optimizer.params.{name}={value!r} contradicts the run ({source}); "
                                  "set it to \"auto\" or remove it")


def deepspeed_settings(cfg: Settings, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for one engine: `dist.deepspeed_config` (a JSON file or inline `{...}`)
    checked, then completed with what the rgan config decides. Pure (no torch, no DeepSpeed), so a bad
    JSON fails at config load, before any process starts; `world_size=None` skips the global-batch
    check, which needs the launcher's world size.

    "auto" (Hugging Face/Accelerate's spelling) is accepted for what the trainer owns and filled from the
    config: batch sizes, gradient accumulation (1), gradient clipping (0: none, as in the other strategies),
    the precision sections (off: bf16 is autocast), Adam's lr/betas/eps/weight_decay and a WarmupLR
    schedule (none). An "auto" in `zero_optimization` (bucket sizes, which HF derives from a transformer's
    hidden size) is dropped, so DeepSpeed's default applies. An "auto" anywhere else is refused."""
    spec = cfg.dist.deepspeed_config.strip()
    where = "dist.deepspeed_config"
    if not spec:
        user: Any = {}
    elif spec.startswith("{"):
        try:
            user = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: inline JSON does not parse ({e.msg} at char {e.pos})") from None
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}={spec!r}: no such file; give a JSON path (see configs/deepspeed/) or {{...}}")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}={spec!r}: not valid JSON ({e.msg}, line {e.lineno})") from None
        where = f"{where}={spec!r}"
    if not isinstance(user, dict):
        raise ConfigError(f"{where}: the JSON must be an object of DeepSpeed settings")
    user = copy.deepcopy(user)
    _owned_sections(user, cfg, where)
    b = cfg.train.batch_size
    owned: dict[str, int] = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1}
    if world_size is not None:
        owned["train_batch_size"] = b * world_size
    elif user.get("train_batch_size") == AUTO:
        user.pop("train_batch_size")  # filled once the launcher's world size is known
    for key, want in owned.items():
        if key in user and user[key] not in (want, AUTO):
            raise ConfigError(f"{where}: {key}={user[key]!r} contradicts the run ({want}, from train.batch_size="
                              f"{b} per rank x {world_size or 1} rank(s), one step per backward); remove it or "
                              "set it to \"auto\"")
    if user.get("gradient_clipping") == AUTO:
        user.pop("gradient_clipping")  # filled below: no clipping, as the other strategies
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: 'zero_optimization' must be an object, e.g. {{\"stage\": 2}}")
    zero = {k: v for k, v in zero.items() if v != AUTO}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: zero_optimization.stage={stage!r} not supported; use 0, 1 or 2 (ZeRO-3 "
                          "partitions the weights, which the gradient penalties' double backward cannot use)")
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            device = zero[key].get("device") if isinstance(zero[key], dict) else None
            if device not in ("none", None) or not isinstance(zero[key], dict):
                raise ConfigError(f"{where}: zero_optimization.{key} is not supported (the client Adam runs on the "
                                  "device); remove it or set its device to \"none\"")
            del zero[key]  # Accelerate writes {"device": "none"}: no offload, which is what we do
    out = user
    out.update(owned)
    out["zero_optimization"] = {**zero, "stage": stage}
    # DeepSpeed >= 0.19.3 clips at 1.0 unless told otherwise; the GAN's update must not change silently.
    out.setdefault("gradient_clipping", 0.0)
    if stage in (1, 2) and not out["gradient_clipping"]:
        # Without clipping nothing needs ZeRO-1/2's global gradient norm, whose validity check reads it on the
        # host at every step (a GPU sync); non-finite steps are skipped on the device by the loop instead.
        out["zero_optimization"].setdefault("compute_grad_norm", False)
    out.setdefault("steps_per_print", 2**31 - 1)
    out.setdefault("wall_clock_breakdown", False)
    left = _auto_keys(out)
    if left:
        raise ConfigError(f"{where}: {left[0]}=\"auto\" is not a value rgan-dist fills (it fills batch sizes, "
                          "precision, optimizer, scheduler, gradient_clipping); give a value or remove it")
    return out


def _same_number(value: Any, want: Any) -> bool:
    """Numbers (or lists of them) equal as floats: an inline `{...}` on the command line is read as YAML, which
    keeps `1e-08` as the string '1e-08'."""
    if isinstance(want, list):
        return isinstance(value, list) and len(value) == len(want) and all(map(_same_number, value, want))
    try:
        return not isinstance(value, bool) and math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


def _auto_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the "auto" values left in a DeepSpeed config."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _auto_keys(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []
