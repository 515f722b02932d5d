#!/usr/bin/env bash
# Install rgan-dist and everything it needs into the current Python (a venv is recommended).
#
#   bash scripts/setup.sh          # the package, for training / the demo
#   bash scripts/setup.sh test     # plus pytest, ruff, hadolint
#
# torch is installed first, as TORCH_SPEC (default "torch==2.13.0") from TORCH_INDEX_URL when given, so that
# nothing else pulls a different build. Which build the default gets depends on where pip looks:
#   - public PyPI on Linux x86_64: the CUDA build (it runs on CPU too, but downloads GBs of CUDA libraries);
#   - the CPU-only build, what the tests need:
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh test
#   - a CUDA build for a given CUDA version (the Dockerfile's):
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
#   - a pip configured with a local wheel cache holding torch-2.13.0+cpu (this project's CI machines):
#     that CPU wheel, with no TORCH_INDEX_URL.
# The last line printed names the build installed (CPU or CUDA x.y).
# Every other dependency is pinned by requirements/constraints.txt (the Dockerfile uses the same file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"   # python3-only systems too
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
extra="${1:-}"
index=()
[ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
"$PY" -m pip install --disable-pip-version-check -q "$TORCH_SPEC" "${index[@]}"
"$PY" -m pip install --disable-pip-version-check -q -c requirements/constraints.txt -e ".${extra:+[$extra]}"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
"$PY" -c "import torch, rgan_dist; build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU-only'
print(f'rgan-dist {rgan_dist.__version__} with torch {torch.__version__} ({build} build)')"
