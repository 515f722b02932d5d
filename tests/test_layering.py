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


PACKAGES = ("rgan_dist", "launcher", "data_pipeline", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(path: Path, name: str, known: set[str], *, function_level: bool) -> set[str]:
    """The tree's modules `name` (the module in `path`) imports: `from a.b import c` counts `a.b.c` where that
    is a module and `a.b` otherwise, relative imports resolved. The packages Python runs on the way
    (`a/__init__` before `a.b`) are not edges: a package's `__init__` re-exporting its own modules is not a
    circle a reader follows, an import naming the package is. Module level includes `if
    TYPE_CHECKING:` blocks (a reader follows them as much as any import); `function_level` adds the imports
    inside functions and methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def nodes(body: list[ast.stmt]):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if function_level:
                    yield from ast.walk(node)
            elif isinstance(node, ast.ClassDef):
                yield from nodes(node.body)
            else:
                for child in ast.walk(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not function_level:
                        continue
                    yield child

    found: set[str] = set()
    for node in nodes(tree.body):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target in known:
                found.add(target)
    found.discard(name)
    return found


def import_cycles(*, function_level: bool) -> list[list[str]]:
    """The tree's import cycles: the strongly connected components (more than one module) of its import graph."""
    files = {module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}
    known = set(files)
    graph = {m: import_edges(f, m, known, function_level=function_level) for m, f in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.mark.parametrize("function_level", [False, True], ids=["module-level", "with-function-level"])
def test_no_import_cycle_anywhere(function_level):
    """No import cycle in rgan_dist, launcher, data_pipeline or benchmarks, so data and control flow
    downward and any module can be read knowing only those below it. Both levels are checked: the
    module-level graph (`if TYPE_CHECKING:` imports included), and the graph with the lazy imports inside
    functions added. A lazy import keeps a CLI light (torch, deepspeed, mlflow load on demand); it must not
    be the way to reach back up, or the layering only holds until the function runs."""
    cycles = import_cycles(function_level=function_level)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


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
