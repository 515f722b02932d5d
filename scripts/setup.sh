#!/usr/bin/env bash
# Install rgan-dist and everything it needs into the current Python (a venv is recommended).
#
#   bash scripts/setup.sh                 # the package, for training / the demo
#   bash scripts/setup.sh test            # plus pytest, ruff, hadolint
#   bash scripts/setup.sh --locked        # the whole environment from requirements/lock.txt (what the image does)
#   bash scripts/setup.sh --locked --deps-only   # the same without rgan-dist itself (the Dockerfile's cached layer)
#
# Default: torch is installed first, as TORCH_SPEC (default "torch==2.13.0") from TORCH_INDEX_URL when given,
# so that nothing else pulls a different build; then the package with `-c requirements/constraints.txt`,
# which pins the direct dependencies (transitive ones take the newest release that fits).
# --locked (or RGAN_LOCKED=1): every package but torch from requirements/lock.txt, exact versions, sha256
# checked (`--require-hashes`), all extras included; then torch from TORCH_SPEC/TORCH_INDEX_URL, whose own
# metadata pins its CUDA libraries; then `pip check`. Why torch is not in the lock: scripts/lock.sh.
# Which torch build TORCH_SPEC gets depends on where pip looks:
#   - public PyPI on Linux x86_64: the CUDA build (it runs on CPU too, but downloads GBs of CUDA libraries);
#   - the CPU-only build, what the tests need:
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh test
#   - a CUDA build for a given CUDA version (the Dockerfile's):
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
#   - a pip configured with a local wheel cache holding torch-2.13.0+cpu (this project's CI machines):
#     that CPU wheel, with no TORCH_INDEX_URL. TORCH_SPEC may also be a wheel file's path.
# The last line printed names the build installed (CPU or CUDA x.y).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"   # python3-only systems too
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
locked="${RGAN_LOCKED:-}"; deps_only=""; extra=""
for arg in "$@"; do
    case "$arg" in
        --locked) locked=1 ;;
        --deps-only) deps_only=1 ;;
        -*) echo "scripts/setup.sh: unknown option $arg (--locked, --deps-only, or an extra such as test)" >&2; exit 2 ;;
        *) extra="$arg" ;;
    esac
done
[ "$locked" = 0 ] && locked=""
if [ -n "$deps_only" ] && [ -z "$locked" ]; then
    echo "scripts/setup.sh: --deps-only goes with --locked (without the lock the package is what pulls them)" >&2
    exit 2
fi
index=()
[ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
pip=("$PY" -m pip install --disable-pip-version-check -q)
if [ -n "$locked" ]; then
    # The lock already holds every extra; an extra named here changes nothing.
    "${pip[@]}" --require-hashes --no-deps -r requirements/lock.txt
    "${pip[@]}" "$TORCH_SPEC" "${index[@]}"
    if [ -z "$deps_only" ]; then "${pip[@]}" --no-deps --no-build-isolation -e .; fi
    "$PY" -m pip check
else
    "${pip[@]}" "$TORCH_SPEC" "${index[@]}"
    "${pip[@]}" -c requirements/constraints.txt -e ".${extra:+[$extra]}"
fi
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
"$PY" -c "import torch; build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU-only'
try:
    import rgan_dist; what = f'rgan-dist {rgan_dist.__version__}'
except ImportError:
    what = 'rgan-dist dependencies'
print(f'{what} with torch {torch.__version__} ({build} build)')"
