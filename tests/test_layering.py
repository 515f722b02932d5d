"""Layering rules that a grep would check too loosely, and the one CLI error handler.

`data_pipeline` knows nothing of GANs (DESIGN.md's shape): it must import nothing from `rgan_dist` or
`launcher`, so it can be reused, tested and installed on its own. Imports are read with `ast` (also
those inside functions, which the package uses to stay light), so a docstring that names the library
does not count and a lazy import does.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from launcher.cli import run_command
from rgan_dist.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_data_pipeline_imports_nothing_of_the_gan_code():
    files = sorted((ROOT / "data_pipeline").rglob("*.py"))
    assert files
    bad = {f"{f.relative_to(ROOT)}: {m}" for f in files for m in imported_modules(f)
           if m.split(".")[0] in ("rgan_dist", "launcher")}
    assert not bad, f"data_pipeline must not import the GAN library or the launcher: {sorted(bad)}"


def test_reading_a_config_does_not_import_torch():
    """Why config.LOSS_NAMES/PENALTY_NAMES are spelled out instead of imported from rgan_dist.losses:
    `rgan train --help` and `--print-config` stay instant."""
    code = "import sys, launcher.train, rgan_dist.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("error", [UsageError("bad --flag"), ConfigError("bad key"), DataError("bad shards")])
def test_one_handler_turns_every_user_error_into_one_line_and_exit_2(error, capsys):
    def run(_args):
        raise error

    assert run_command("rgan x", run, None) == 2
    assert capsys.readouterr().err == f"rgan x: error: {error}\n"


def test_a_bug_keeps_its_traceback():
    def run(_args):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        run_command("rgan x", run, None)
