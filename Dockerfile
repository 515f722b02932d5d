# rgan-dist: the image that reproduces a run, months later. It installs exactly as the README's set-up
# does (scripts/setup.sh with requirements/constraints.txt), with the CUDA build of the pinned torch.
#
#   docker build -t rgan-dist .
#   # A host folder as the working directory: shards in ./data, outputs (runs/, mlflow.db, mlruns/) land there.
#   docker run --rm --gpus all --shm-size=8g -v "$PWD:/work" -w /work rgan-dist \
#       train --config /opt/rgan-dist/configs/paper/cat64.yaml data.shards=data/cat64
#   docker run --rm --gpus all --shm-size=8g -v "$PWD:/work" -w /work rgan-dist \
#       sweep --config /opt/rgan-dist/configs/sweeps/paper_cifar10.yaml
#
# The Ray cluster YAMLs (launcher/cluster/) run this image on every node; they start it with
# --entrypoint="" because Ray runs its own commands in the container.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

LABEL org.opencontainers.image.title="rgan-dist" \
      org.opencontainers.image.description="Relativistic GANs at scale: DDP/DeepSpeed training, FID, MLflow, Ray Tune sweeps" \
      org.opencontainers.image.licenses="MIT"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's pinned Ubuntu release; Python packages are pinned exactly.
# openssh-client and rsync: what Ray's cluster launcher uses to reach and sync the nodes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
        openssh-client rsync \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/rgan-dist
COPY . .

# TORCH_SPEC/TORCH_INDEX_URL pick the CUDA build of the same torch version the README pins (setup.sh's
# default is the CPU wheel); RGAN_EXTRAS=cluster adds what a Ray head node needs (dashboard, AWS autoscaler).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG RGAN_EXTRAS=cluster
RUN TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" bash scripts/setup.sh "$RGAN_EXTRAS"

# Runs write under the working directory (runs/, mlflow.db, mlruns/): run with a mounted host folder as -w.
RUN useradd --create-home --uid 1000 rgan && chown -R 1000:1000 /opt/rgan-dist
USER 1000:1000

# Ray dashboard, MLflow UI, Ray GCS (when the container is a Ray head node).
EXPOSE 8265 5000 6379
ENTRYPOINT ["rgan"]
CMD ["--help"]
