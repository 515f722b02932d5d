#!/usr/bin/env bash
# Do the ranges declared in pyproject.toml resolve on their own? What a user installing rgan-dist by name gets
# is pip's resolution of those ranges, without requirements/constraints.txt. Issue 19: `pip install -e ".[s3]"`
# and `".[test]"` ended in ResolutionImpossible after pip backtracked through every aiobotocore, s3fs and ray
# release. This resolves the package and each extra (and all of them together) with `pip install --dry-run
# --ignore-installed` (nothing is installed; wheels pip needs for metadata are fetched) and fails on the first
# that does not resolve, printing pip's last lines.
#
#   bash scripts/check_extras.sh            # every extra; ~1-3 min each on a fresh cache
#   bash scripts/check_extras.sh s3 test    # only these
#
# torch is taken as installed (TORCH_SPEC chooses the build; see pyproject.toml); the extras' ranges are the point.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [ "$#" -gt 0 ]; then extras=("$@"); else extras=("" s3 test cluster "s3,test,cluster"); fi
torch_pin="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "torch==$torch_pin" > "$tmp/torch.txt"
status=0
for extra in "${extras[@]}"; do
    target="."; [ -n "$extra" ] && target=".[$extra]"
    start=$SECONDS
    if "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$tmp/report.json" -c "$tmp/torch.txt" \
            -e "$target" > "$tmp/log" 2>&1; then
        # Resolving is not enough: an extra the package does not provide is a warning, and installs nothing.
        missing="$(grep -o "does not provide the extra '[^']*'" "$tmp/log" | sort -u | tr '\n' ' ' || true)"
        n="$("$PY" -c '
import json, sys
names = {i["metadata"]["name"].lower() for i in json.load(open(sys.argv[1]))["install"]}
want = {"s3": {"s3fs", "boto3"}, "test": {"s3fs", "boto3", "moto", "playwright"}, "cluster": {"boto3", "ray"}}
lacking = sorted(set().union(*(want.get(e, set()) for e in sys.argv[2].split(","))) - names)
print(f"{len(names)} packages" + (f"; LACKS {lacking}" if lacking else ""))' "$tmp/report.json" "$extra")"
        if [ -n "$missing" ] || [[ "$n" == *LACKS* ]]; then
            echo "check_extras: $target resolves but is incomplete: ${missing:-}$n" >&2
            status=1
        else
            echo "check_extras: $target resolves: $n in $((SECONDS - start)) s"
        fi
    else
        echo "check_extras: $target does NOT resolve without requirements/constraints.txt ($((SECONDS - start)) s):" >&2
        grep -v "^WARNING: Location" "$tmp/log" | tail -n 15 >&2
        status=1
    fi
done
exit "$status"
