# syntax=docker/dockerfile:1
# zeroshot-inspect: the inspection API in a container. One Dockerfile, two flavours:
#
#   GPU (default): CUDA runtime + cuDNN base, CUDA wheels of torch, onnxruntime-gpu
#     docker build -t zeroshot-inspect:gpu .
#   CPU: Debian slim + Python, CPU-only torch wheels (no ~3 GB of CUDA libraries), onnxruntime
#     docker build -t zeroshot-inspect:cpu \
#       --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       --build-arg EXTRAS=saa,onnx .
#
# docker-compose.yml builds both (profiles gpu / cpu). No weights are baked in: they live
# on the /weights volume (fetch them with `anomaly-inspect weights fetch`, see docs/deploy.md).
# BAKE_WEIGHTS="name ..." bakes the named manifest entries into the image (needs network
# at build time; an image for an offline line PC).
#
# The GPU base: CUDA 13 / cuDNN 9, matching current onnxruntime-gpu wheels (torch's CUDA
# wheels bring their own CUDA libraries). Host needs the NVIDIA driver for CUDA 13 and the
# NVIDIA Container Toolkit. For an older driver use e.g.
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- base: Python + runtime libs
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# python:*-slim images have Python; CUDA (Ubuntu) images get the distribution's python3.
# libgl1/libglib2.0-0: OpenCV (pulled in by groundingdino-py) needs them at import.
RUN set -eux; \
    pkgs="ca-certificates libgl1 libglib2.0-0 libgomp1"; \
    command -v python3 >/dev/null 2>&1 || pkgs="$pkgs python3 python3-venv"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- builder: a venv in /opt/venv
FROM base AS builder
RUN set -eux; \
    pkgs="build-essential"; \
    python3 -c "import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')) else 1)" \
        || pkgs="$pkgs python3-dev"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip "setuptools>=68" wheel

# torch first, pinned (the versions the project is tested with). Empty TORCH_INDEX_URL = PyPI
# (CUDA builds on Linux x86_64); the CPU flavour uses the CPU wheel index: same version, no CUDA.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY prompts ./prompts
# groundingdino-py (extra `saa`) builds against the installed torch: no build isolation.
ARG EXTRAS=saa,onnx-gpu
RUN pip install --no-build-isolation ".[${EXTRAS}]"
# fail the build here, not at the first request, if package data did not make it into the wheel
RUN cd / && python -c "import models.weights as w; assert w.manifest(), 'empty weights manifest'" \
    && anomaly-inspect --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM base AS runtime
ARG APP_UID=10001
RUN useradd --create-home --uid "${APP_UID}" --shell /usr/sbin/nologin app \
    && mkdir -p /weights /data \
    && chown app:app /weights /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    ZSI_WEIGHTS_DIR=/weights \
    ZSI_DATA_DIR=/data \
    ZSI_DEVICE=auto \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER app
WORKDIR /home/app

# Optional, off by default: bake manifest entries into the image (network needed at build time).
ARG BAKE_WEIGHTS=
RUN if [ -n "${BAKE_WEIGHTS}" ]; then anomaly-inspect weights fetch ${BAKE_WEIGHTS} --dir /weights --quiet; fi
VOLUME ["/weights", "/data"]

EXPOSE 8000
# /health = the process answers (readiness, models loaded, is /ready)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["anomaly-inspect"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
