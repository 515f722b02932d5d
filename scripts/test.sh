#!/usr/bin/env bash
# The whole test suite: lint, Dockerfile lint, then pytest (CPU only; gloo for multi-process tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"   # python3-only systems too
bin="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$bin:$PATH"   # console scripts (rgan, hadolint) even where pyenv shims are stale
ruff check .
hadolint Dockerfile
status=0
"$PY" -m pytest "$@" || status=$?
# Exit 5 is pytest's "collected no test": a typo in -k/-m or a broken testpaths, never a pass.
[ "$status" -ne 5 ] || echo "test.sh: pytest ran no test (exit 5): check the -k/-m selection" >&2
exit "$status"
