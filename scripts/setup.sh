#!/usr/bin/env bash
# Install rgan-dist and everything it needs into the current Python (a venv is recommended).
#
#   bash scripts/setup.sh          # the package, for training / the demo
#   bash scripts/setup.sh test     # plus pytest, ruff, hadolint
#
# TORCH_SPEC picks the torch build, installed first so nothing else pulls a different one:
#   TORCH_SPEC="torch==2.13.0" (default: the CPU wheel) ...
#   TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
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
"$PY" -c "import torch, rgan_dist; print(f'rgan-dist {rgan_dist.__version__} with torch {torch.__version__}')"
