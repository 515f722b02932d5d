# rgan-dist: the image that reproduces a run. Same install path as the README (scripts/setup.sh and
# requirements/constraints.txt), with a CUDA build of the pinned torch.
#   docker build -t rgan-dist .
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD/runs:/opt/rgan-dist/runs" rgan-dist \
#       train --config configs/paper/cat64.yaml data.shards=/data/cat64
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's pinned Ubuntu release; Python packages are pinned exactly.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/rgan-dist
COPY . .

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" bash scripts/setup.sh

# Runs write under the working directory (runs/, mlflow.db): mount a host folder on /opt/rgan-dist/runs.
RUN useradd --create-home --uid 1000 rgan && chown -R 1000:1000 /opt/rgan-dist
USER 1000:1000
ENTRYPOINT ["rgan"]
CMD ["--help"]
