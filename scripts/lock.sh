#!/usr/bin/env bash
# Regenerate requirements/lock.txt: every package of the whole environment (the package, all its extras)
# at an exact version with the sha256 of every file PyPI has for it, so `pip install --require-hashes`
# installs byte-identical dependencies months later (scripts/setup.sh --locked, the Dockerfile).
#
#   pip install uv && bash scripts/lock.sh      # after changing pyproject.toml or requirements/constraints.txt
#
# Resolved with uv for Python >= 3.11 on every platform (--universal: Ubuntu 24.04's 3.12 in the image, 3.11
# here), within requirements/constraints.txt, with torch pinned to TORCH_SPEC's version. torch itself and the
# packages only its build chooses (nvidia-*, cuda-*, triton) are left out: the CPU wheel, the cu128 wheel and
# PyPI's CUDA 13 wheel are different files with different hashes and different CUDA dependencies, so setup.sh
# installs torch after the lock from TORCH_SPEC/TORCH_INDEX_URL, and that wheel's metadata pins its CUDA
# libraries exactly (`nvidia-cudnn-cu12==...`). torch's other dependencies (sympy, networkx, ...) are locked.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
command -v uv >/dev/null || { echo "scripts/lock.sh: needs uv (pip install uv)" >&2; exit 2; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "$TORCH_SPEC" > "$tmp/torch.txt"
compile=(uv pip compile pyproject.toml --all-extras -c requirements/constraints.txt -c "$tmp/torch.txt"
         --universal --python-version 3.11 --generate-hashes --quiet)
# First pass: find which of the resolved packages belong to torch's build; second pass: the lock without them.
"${compile[@]}" --no-header -o "$tmp/full.txt"
mapfile -t left_out < <(grep -oE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$tmp/full.txt" | sed 's/==$//' | sort -u)
skip=()
for name in "${left_out[@]}"; do skip+=(--no-emit-package "$name"); done
"${compile[@]}" --custom-compile-command "bash scripts/lock.sh" "${skip[@]}" -o requirements/lock.txt
echo "requirements/lock.txt: $(grep -cE '^[a-z0-9]' requirements/lock.txt) packages; left to TORCH_SPEC: ${left_out[*]}"
