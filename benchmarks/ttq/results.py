"""The results store: `<out>/results.json`, every finished run appended as it lands, so a rerun of the same
command continues a killed benchmark; plus the machine a run was measured on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from benchmarks.ttq.profiles import FORMAT, usage_error
from benchmarks.ttq.run import RunSpec


class Results:
    """`<out>/results.json`: header (benchmark, machine, invocations) and one record per finished run,
    rewritten atomically after each run so a kill never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": FORMAT, "invocations": [], "runs": []}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError as e:
                raise usage_error(f"{path}: not readable JSON ({e}); move it away to start afresh") from None
            if self.data.get("format") != FORMAT:
                raise usage_error(f"{path}: not a time_to_quality results file (format {self.data.get('format')!r})")

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    def finished(self, spec: RunSpec) -> dict[str, Any] | None:
        """The stored record of `spec`, if any; a record made with other settings is an error, so two
        budgets never end up in one table."""
        for r in self.runs:
            if (r["workload"], r["variant"], r["seed"]) == spec.key:
                stored = {"data_seed": 0, **(r.get("settings") or {})}  # records from before data seeds: seed 0
                if stored != spec.settings():
                    raise usage_error(f"{self.path} holds {spec.name} made with other settings "
                                      f"({_settings_diff(stored, spec.settings())}); use another "
                                      f"--out or the same flags")
                return r
        return None

    def add(self, record: dict[str, Any]) -> None:
        self.runs.append(record)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def _settings_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k == "overrides":
                x, y = set(a.get(k) or []), set(b.get(k) or [])
                return f"stored {sorted(x - y)} vs now {sorted(y - x)}"
            return f"{k}: stored {a.get(k)} vs now {b.get(k)}"
    return "?"


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads_default": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info
