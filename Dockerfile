# syntax=docker/dockerfile:1
# zeroshot-inspect: the inspection API in a container. One Dockerfile, two flavours, both on
# a slim Debian + Python base; they differ only in where torch comes from:
#
#   GPU (default): torch's CUDA wheels from PyPI, onnxruntime-gpu
#     docker build -t zeroshot-inspect:gpu .
#   CPU: torch's CPU-only wheels (no ~3 GB of CUDA libraries), onnxruntime
#     docker build -t zeroshot-inspect:cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       --build-arg EXTRAS=saa,onnx .
#
# docker-compose.yml builds both (profiles gpu / cpu). No weights are baked in: they live
# on the /weights volume (fetch them with `anomaly-inspect weights fetch`, see docs/deploy.md).
# BAKE_WEIGHTS="name ..." bakes the named manifest entries into the image (needs network
# at build time; an image for an offline line PC).
#
# CUDA comes ONCE, from pip: torch's PyPI wheels for Linux x86_64 depend on NVIDIA's CUDA
# runtime, cuBLAS, cuDNN ... wheels (CUDA 13 / cuDNN 9 for torch 2.14) and load those, never a
# system CUDA, so a CUDA base image would be a second, unused copy (~3 GB). onnxruntime-gpu
# (CUDA 13 / cuDNN 9 builds) uses the same libraries, loaded when torch is imported first, as
# models/onnx_export.py does. The host needs only the NVIDIA driver (CUDA 13: driver >= 580)
# and the NVIDIA Container Toolkit. Older driver: CUDA 12 wheels, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   (pytorch.org lists the CUDA builds of a release)
# (and an onnxruntime-gpu built for CUDA 12 if you use the ONNX backend).
# The CPU flavour's build machine must reach download.pytorch.org (or set TORCH_INDEX_URL to
# a mirror of that index); everything else comes from PyPI.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- base: Python + runtime libs
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# python:*-slim images have Python; another Debian/Ubuntu BASE_IMAGE gets the distribution's python3.
# (Never an nvidia/cuda base together with CUDA torch wheels: CUDA twice.)
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
# (CUDA builds on Linux x86_64, with their CUDA libraries as pip wheels); the CPU flavour uses
# the CPU wheel index: same version, no CUDA.
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
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
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
