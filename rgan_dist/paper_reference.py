"""The paper's FIDs beside ours: look up which cell of the paper's tables a run reproduces.

The numbers live in `configs/paper/reference_fid.toml` (data, with their source), not in code, so a
correction is a one-line data change. A run is matched to a cell by its resolved config, given either
as typed values (a `Config.flat()` dict, a sweep trial's overrides) or as MLflow's string params
(`"0.0002"`, `"[0.5, 0.999]"`): the loss variant picks the row, the hyperparameters pick the column
(setup). A run that differs from every setup of the table (e.g. another learning rate) has no paper
value, which is the honest answer: its FID is not comparable with the paper's. The same holds for the
FID protocol: every table names the evaluation keys of the paper's own sampling (`protocol`: G in train
mode, batches of 100), and a run evaluated another way (e.g. `eval.g_mode=eval`) matches no cell.

Which table a run belongs to (CIFAR-10, CAT at 64/128/256) is not guessed from a data path: it is named
explicitly (`rgan sweep` reads `paper:` from the sweep file and tags every run with `rgan.paper_table`).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rgan_dist.errors import UsageError

REFERENCE_FILE = Path(__file__).resolve().parent.parent / "configs" / "paper" / "reference_fid.toml"
TABLE_TAG = "rgan.paper_table"  # MLflow tag naming the paper table a run reproduces
LOSS_ALIASES = {"rpgan": "rsgan"}


@dataclass(frozen=True)
class PaperCell:
    """One value of the paper: `fid` is a number, or None with `note` (">100", "failed") when the paper
    gives only a bound or a failure."""

    table: str
    variant: str
    setup: str
    setup_label: str
    fid: float | None
    note: str = ""

    def text(self) -> str:
        return f"{self.fid:.2f}" if self.fid is not None else self.note


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    source: str
    setups: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    num_samples: int | None = None
    protocol: dict[str, Any] = field(default_factory=dict)  # evaluation keys a run must share to match


@lru_cache(maxsize=4)
def load_reference(path: str | Path | None = None) -> dict[str, PaperTable]:
    """Every table of the reference file, by name (cifar10, cat64, cat128, cat256)."""
    p = Path(path) if path else REFERENCE_FILE
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"paper reference file {p} is missing: run from a source checkout") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"paper reference file {p}: not valid TOML ({e})") from None
    out = {}
    for name, t in raw.items():
        setups = {k: dict(v) for k, v in t.get("setups", {}).items()}
        out[name] = PaperTable(name=name, title=t.get("title", name), source=t.get("source", ""), setups=setups,
                               rows=list(t.get("rows", [])), num_samples=t.get("num_samples"),
                               protocol=dict(t.get("protocol", {})))
    return out


def table_names() -> list[str]:
    return sorted(load_reference())


def get_table(name: str) -> PaperTable:
    tables = load_reference()
    if name not in tables:
        raise UsageError(f"paper table {name!r}: unknown; choose one of {', '.join(sorted(tables))}")
    return tables[name]


def _parse(value: Any) -> Any:
    """MLflow params are strings; config values are typed. Bring both to typed values."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _same(a: Any, b: Any) -> bool:
    a, b = _parse(a), _parse(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _loss(params: Mapping[str, Any]) -> tuple[str, str]:
    name = str(_parse(params.get("loss.name", "")))
    penalty = str(_parse(params.get("loss.penalty", "none")) or "none")
    return LOSS_ALIASES.get(name, name), penalty


def _matches(keys: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    return all(k in params and _same(params[k], v) for k, v in keys.items() if k != "label")


def paper_fid(table: str, params: Mapping[str, Any]) -> PaperCell | None:
    """The paper's value for a run with these (flat, dotted) config values, or None when the run's
    loss variant or hyperparameters are not in the table. A key the run does not carry does not match."""
    t = get_table(table)
    if not _matches(t.protocol, params):
        return None  # sampled another way than the paper: not comparable, whatever the setup
    loss, penalty = _loss(params)
    setup = next((name for name, keys in t.setups.items() if _matches(keys, params)), None)
    if setup is None:
        return None
    for row in t.rows:
        if (LOSS_ALIASES.get(row["loss.name"], row["loss.name"]), row.get("loss.penalty", "none")) != (loss, penalty):
            continue
        if not _matches(row.get("match", {}), params):
            continue
        value = row.get("fid", {}).get(setup)
        if value is None:
            return None  # the paper ran this variant, but not under this setup
        label = t.setups[setup].get("label", setup)
        if isinstance(value, str):
            return PaperCell(t.name, row["variant"], setup, label, None, value)
        return PaperCell(t.name, row["variant"], setup, label, float(value))
    return None


def beside_paper(runs: Iterable[tuple[str, Mapping[str, Any], float | None]], table: str) -> str:
    """A markdown table: each run's FID next to the paper's for the same variant and setup.

    `runs` yields (run name, flat config params, our FID or None). Rows without a paper value are kept
    (their paper column says so), so nothing of ours disappears from the comparison."""
    t = get_table(table)
    lines = [f"Paper: {t.title}; source: {t.source}.", "",
             "| Run | Paper variant | Setup | Our FID | Paper FID |", "|---|---|---|---:|---:|"]
    for name, params, fid in runs:
        cell = paper_fid(table, params)
        ours = "–" if fid is None or not math.isfinite(fid) else f"{fid:.2f}"
        if cell is None:
            loss, penalty = _loss(params)
            variant = loss if penalty == "none" else f"{loss} + {penalty}"
            where = "(not in the paper's table)" if _matches(t.protocol, params) else \
                "(FID protocol differs from the paper's: " + ", ".join(f"{k}={v}" for k, v in t.protocol.items()) + ")"
            lines.append(f"| {name} | {variant} | {where} | {ours} | – |")
        else:
            lines.append(f"| {name} | {cell.variant} | {cell.setup_label} | {ours} | {cell.text()} |")
    if t.num_samples:
        lines += ["", f"The paper's FIDs use {t.num_samples} generated samples; compare only FIDs computed with "
                      "the same N, network and resize."]
    return "\n".join(lines)
