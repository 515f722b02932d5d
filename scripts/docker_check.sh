#!/usr/bin/env bash
# Build the real Dockerfile and train inside the image, with no registry: the base is a Debian bookworm
# made by debootstrap (cached), the torch wheel a CPU one, the OCI build podman's (chroot isolation, which
# works without a daemon or user namespaces). Run by hand, as root, on a Debian/Ubuntu machine; it takes
# minutes (figures: benchmarks/RESULTS.md, "Docker image"). Not part of pytest: tests/test_docker.py keeps the
# static checks, this script the real build.
#
#   apt-get install -y podman buildah debootstrap
#   bash scripts/docker_check.sh
#
# What it checks, each failing the script: the build; the dependency layer is reused after a source-only
# edit; inside the image as its user and as an arbitrary uid: `rgan --help`, `rgan demo train.steps=50`
# (loss lines and a checkpoint), torch.compile (Inductor's run-time C++ build), the git commit label and env.
# Environment: RGAN_DOCKER_WORK (cache folder, default /var/tmp/rgan-docker), TORCH_SPEC (default
# torch==2.13.0+cpu, fetched with pip download: a pip with a wheel cache holding it, or set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu), DEMO_STEPS (default 50).
# `podman run` itself fails in some sandboxes (setrlimit), so commands run with `buildah run`.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${RGAN_DOCKER_WORK:-/var/tmp/rgan-docker}"
BASE=localhost/debian-min:bookworm
IMAGE=localhost/rgan-dist:check
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
DEMO_STEPS="${DEMO_STEPS:-50}"
for tool in podman buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "docker_check: needs $tool (apt-get install -y podman buildah debootstrap)" >&2; exit 2; }
done
mkdir -p "$WORK/wheels"
log() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
stamp() { date +%s; }

if ! podman image exists "$BASE"; then
    log "base image: debootstrap bookworm"
    [ -x "$WORK/root-bookworm/usr/bin/apt-get" ] || debootstrap --variant=minbase bookworm "$WORK/root-bookworm"
    # The host's CA bundle goes along as PIP_CERT: where PyPI is reached through a TLS-inspecting proxy whose
    # CA only the host trusts, pip in the build needs it (a real CUDA base on an open network does not).
    mkdir -p "$WORK/root-bookworm/etc/ssl"
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/root-bookworm/etc/ssl/host-ca-bundle.crt"
    tar -C "$WORK/root-bookworm" -c . | podman import --change ENV=PIP_CERT=/etc/ssl/host-ca-bundle.crt - "$BASE"
fi

log "torch wheel: $TORCH_SPEC (Debian bookworm's Python 3.11)"
index=(); [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    -d "$WORK/wheels" "$TORCH_SPEC" "${index[@]}"
version="${TORCH_SPEC#*==}"
wheel="$(cd "$WORK/wheels" && ls -1 torch-"${version}"-cp311-*.whl | head -1)"

# The context: the files git would commit (tracked and untracked-not-ignored), so the check builds the
# working tree as it is, and the source-only edit below never touches the checkout.
ctx="$WORK/context"
rm -rf "$ctx" && mkdir -p "$ctx"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents -- {} "$ctx/" 2>/dev/null || true
build() {
    podman build --isolation chroot --network host --layers -v "$WORK/wheels:/wheels:ro" \
        --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_SPEC="/wheels/$wheel" --build-arg TORCH_INDEX_URL= \
        --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t "$IMAGE" "$ctx"
}
log "build"
t0=$(stamp); build > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; echo "docker_check: build failed, see $WORK/build.log" >&2; exit 1; }
build_s=$(( $(stamp) - t0 ))
grep -E 'STEP|Using cache|with torch' "$WORK/build.log"

log "rebuild after a source-only edit"
echo "# docker_check: a source-only edit" >> "$ctx/rgan_dist/__init__.py"
t0=$(stamp); build > "$WORK/rebuild.log" 2>&1 || { tail -30 "$WORK/rebuild.log"; echo "docker_check: rebuild failed, see $WORK/rebuild.log" >&2; exit 1; }
rebuild_s=$(( $(stamp) - t0 ))
grep -A1 -E 'setup.sh --locked --deps-only' "$WORK/rebuild.log" | grep -q 'Using cache' \
    || { echo "docker_check: the dependency layer was rebuilt after a source-only edit" >&2; exit 1; }

grep -E 'STEP|Using cache' "$WORK/rebuild.log" | grep -B1 -A0 'Using cache' | grep STEP | sed 's/^/cached: /' | cut -c1-110
echo "the image's layers, newest first (a source edit changes only those above the venv's):"
podman history --format '{{.Size}}	{{.CreatedBy}}' "$IMAGE" | cut -c1-120 | head -12
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
label=$(podman image inspect --format '{{index .Labels "org.opencontainers.image.revision"}}' "$IMAGE")
[ "$label" = "$(git rev-parse HEAD)" ] || { echo "docker_check: revision label is '$label'" >&2; exit 1; }

ctr=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
in_image() { buildah run --isolation chroot "$@"; }
log "inside the image: rgan --help, who, HOME, git commit"
in_image "$ctr" -- sh -c 'id; echo "HOME=$HOME RGAN_GIT_COMMIT=$RGAN_GIT_COMMIT"; rgan --help | head -3'
in_image "$ctr" -- python -c "from rgan_dist.tracking import git_state; print(git_state())"
log "inside the image: torch.compile (Inductor builds C++ at run time)"
in_image "$ctr" -- python -c "import torch; f = torch.compile(lambda x: torch.sin(x) * 2 + 1); print('compiled:', f(torch.zeros(4)).tolist())"
log "inside the image: rgan demo train.steps=$DEMO_STEPS, as the image's user"
t0=$(stamp)
in_image "$ctr" -- rgan demo train.steps="$DEMO_STEPS" train.log_every=10 checkpoint.every="$DEMO_STEPS" 2>&1 | tail -8
demo_s=$(( $(stamp) - t0 ))
in_image "$ctr" -- sh -c "ls runs/demo/checkpoints/ | grep -q ckpt-$(printf %08d "$DEMO_STEPS")" \
    || { echo "docker_check: the demo wrote no checkpoint" >&2; exit 1; }
log "inside the image: an arbitrary uid (docker run --user 4242:4242)"
in_image --user 4242:4242 "$ctr" -- sh -c 'cd "$HOME" && mkdir -p .cache/check && rgan demo train.steps=2 train.log_every=1 checkpoint.every=2 2>&1 | tail -2 && ls -d runs/demo'

log "two containers, one torchrun each (README's multi-node recipe: --network host), strategy deepspeed"
# What `docker run --network host --ipc host ... --entrypoint torchrun` does on two nodes, here two containers
# on one host: c10d rendezvous on the host network, gloo on CPU, checkpoints on a folder both mount.
shared="$WORK/shared"; rm -rf "$shared"; mkdir -p "$shared"; chmod 1777 "$shared"
ctr2=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" "$ctr2" >/dev/null 2>&1 || true' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# `docker run --network host` also gives the container the host's hostname, which torchrun's rendezvous
# advertises to the other node; buildah does that with --uts host.
node() {
    in_image --network host --uts host -v "$shared:/shared" -e GLOO_SOCKET_IFNAME=lo "$1" -- \
        torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint "127.0.0.1:$port" \
        --rdzv_id docker-check -m launcher train --config /opt/rgan-dist/configs/demo.yaml \
        dist.strategy=deepspeed dist.deepspeed_config=/opt/rgan-dist/configs/deepspeed/zero1.json \
        model.resolution=16 model.width=8 model.z_dim=16 train.batch_size=4 train.steps=4 train.log_every=2 \
        train.progress=false run.name=two-nodes run.out_dir=/shared/two-nodes checkpoint.every=4
}
t0=$(stamp)
node "$ctr" > "$WORK/node0.log" 2>&1 & pid0=$!
node "$ctr2" > "$WORK/node1.log" 2>&1 & pid1=$!
wait "$pid0" && wait "$pid1" || { tail -n 20 "$WORK/node0.log" "$WORK/node1.log"; echo "docker_check: two-container torchrun failed" >&2; exit 1; }
two_s=$(( $(stamp) - t0 ))
grep -ah '^rgan: \(dcgan\|finished\)' "$WORK/node0.log" "$WORK/node1.log"   # rank 0 is in either container
ls "$shared/two-nodes/checkpoints/" | grep -q 'ckpt-00000004' || { echo "docker_check: no checkpoint from the two-container run" >&2; exit 1; }

log "figures"
echo "build: ${build_s}s; rebuild after a source-only edit: ${rebuild_s}s (dependency layer reused); image: $((size / 1000000)) MB; demo (${DEMO_STEPS} steps): ${demo_s}s; two-container torchrun (4 steps): ${two_s}s"
