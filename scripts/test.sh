#!/usr/bin/env bash
# The whole test suite: lint, Dockerfile lint, then pytest (CPU only; gloo for multi-process tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"   # python3-only systems too
bin="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$bin:$PATH"   # console scripts (rgan, hadolint) even where pyenv shims are stale
ruff check .
hadolint Dockerfile
"$PY" -m pytest "$@"
