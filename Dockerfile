# rgan-dist: the image that reproduces a run, months later.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t rgan-dist .
#   # A host folder as the working directory: shards in ./data, outputs (runs/, mlflow.db, mlruns/) land there.
#   docker run --rm --gpus all --shm-size=8g -v "$PWD:/work" -w /work rgan-dist \
#       train --config /opt/rgan-dist/configs/paper/cat64.yaml data.shards=data/cat64
#
# Three stages. `deps` installs the dependencies from requirements/lock.txt (exact versions, sha256-checked)
# into a venv, in a layer that only the lock, scripts/setup.sh and the torch build arguments invalidate;
# `wheel` builds rgan-dist's wheel from the source; the runtime copies the venv onto a fresh base and
# installs the wheel (non-editable) on top. A source edit rebuilds only the wheel and the runtime's last
# small layers: the multi-GB venv layer stays cached, on the builder and in every registry that holds it.
#
# Base: CUDA's `base` flavour (the CUDA runtime loader only): the torch cu128 wheel bundles CUDA, cuDNN and
# NCCL itself, so a `-runtime`/`-cudnn-runtime` base would only duplicate gigabytes. Pinned by digest; the
# digest is one that public Dockerfiles and scripts record for this tag; another, e711c993..., is recorded as
# well (the multi-arch index vs. the amd64 manifest, or a re-published tag: not known). Neither was checked
# against the registry (none is reachable where this was written): before relying on it, compare with
# `docker buildx imagetools inspect nvidia/cuda:12.8.1-base-ubuntu24.04`.
# BASE_IMAGE can be any Debian/Ubuntu image with apt; scripts/docker_check.sh builds on Debian bookworm.
# The Ray cluster YAMLs (launcher/cluster/) run this image on every node with --entrypoint="".
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:133c78a0575303be34164d0b90137a042172bdf60696af01a3c424ab402d86e2

FROM ${BASE_IMAGE} AS deps
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
# TORCH_SPEC/TORCH_INDEX_URL: the CUDA 12.8 build of the torch version setup.sh installs by default (the lock
# leaves torch out: CPU and CUDA wheels differ; see scripts/lock.sh). TORCH_SPEC may be a wheel file's path.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY scripts/setup.sh scripts/
COPY requirements/ requirements/
RUN TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" bash scripts/setup.sh --locked --deps-only


FROM deps AS wheel
COPY . .
# setuptools comes from the lock, so --no-build-isolation builds the package with hash-checked tools too.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist .


FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="rgan-dist" \
      org.opencontainers.image.description="Relativistic GANs at scale: DDP/DeepSpeed training, FID, MLflow, Ray Tune sweeps" \
      org.opencontainers.image.licenses="MIT"
# HOME is set here, not taken from /etc/passwd, so it holds under `docker run --user $(id -u)` too (a uid
# with no passwd entry); it is world-writable (sticky, like /tmp) so torch, Triton, DeepSpeed and matplotlib
# caches and Ray's `~/` file mounts work whatever uid runs the container.
# GIT_PYTHON_REFRESH: MLflow imports GitPython, which refuses to import without a git binary; there is no
# checkout in the image (the commit is RGAN_GIT_COMMIT, below).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/rgan \
    GIT_PYTHON_REFRESH=quiet

# python3: the interpreter the venv was built on (same base, same package).
# RUNTIME_TOOLCHAIN (g++ and the Python headers) stays in the runtime on purpose: torch.compile
# (`train.compile=true`) compiles at run time, C++ with g++ on CPU and Triton's launcher (a C file including
# Python.h) on GPU, and DeepSpeed JIT-builds its CPU ops (e.g. CPUAdam for an offload config) with g++ and
# ninja. Measured cost: about 290 MB (apt's figure on Ubuntu 24.04 and Debian 12), beside several GB of the
# CUDA torch. `--build-arg RUNTIME_TOOLCHAIN=` drops it, and with it train.compile. DeepSpeed's CUDA ops
# (FusedAdam, ...) would need nvcc, which only the `devel` flavour has: rgan-dist does not use them (each
# engine gets torch's Adam as a client optimizer), so nothing is pre-built (DS_BUILD_OPS stays unset).
# openssh-client and rsync: what Ray's cluster launcher uses to reach and sync the nodes.
ARG RUNTIME_TOOLCHAIN="g++ python3-dev"
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 $RUNTIME_TOOLCHAIN openssh-client rsync ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --home-dir /home/rgan --create-home --shell /bin/bash rgan \
    && chmod 1777 /home/rgan \
    && mkdir -p /opt/rgan-dist \
    && chmod 1777 /opt/rgan-dist

COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist/ /tmp/dist/
# /opt/rgan-dist/configs: the configs installed with the package, at a path that does not name the Python version.
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && pip check \
    && ln -s "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/configs" /opt/rgan-dist/configs \
    && rgan --help > /dev/null

# Last, so a new commit re-tags the image without invalidating a layer above. The MLflow tag
# mlflow.source.git.commit reads RGAN_GIT_COMMIT when there is no git checkout (rgan_dist/tracking.py).
ARG GIT_COMMIT=""
LABEL org.opencontainers.image.revision="${GIT_COMMIT}"
ENV RGAN_GIT_COMMIT="${GIT_COMMIT}"

# Runs write under the working directory (runs/, mlflow.db, mlruns/): mount a host folder and pass it as -w.
WORKDIR /opt/rgan-dist
USER 10001:10001

# Ray dashboard, MLflow UI, Ray GCS (when the container is a Ray head node).
EXPOSE 8265 5000 6379
ENTRYPOINT ["rgan"]
CMD ["--help"]
