# syntax=docker/dockerfile:1
# The Tureen server image: `tureen serve` as the entrypoint, configured by flags and environment.
#
# CPU (the default): python slim base, torch from PyTorch's CPU-only wheel index.
#   docker build -t tureen:0.1.0-cpu .
# CUDA: a CUDA runtime base (Ubuntu; its python3 is used) and torch's CUDA wheels.
#   docker build -t tureen:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Run: docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 tureen:0.1.0-cpu     (serves the demo)
# The Helm chart (helm/tureen) sets the command and arguments itself.

ARG BASE_IMAGE=python:3.12-slim-bookworm

# ---- base: Python 3, whichever image it comes from ------------------------------------------------
FROM ${BASE_IMAGE} AS base
# The python images have Python already; CUDA images are plain Ubuntu and get the distribution's.
# Versions are not pinned: they are the base image's own distribution's.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build: a virtual environment with torch and tureen ------------------------------------------
FROM base AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/tureen
ENV PATH=/opt/tureen/bin:$PATH
# torch first, from the index that decides CPU or CUDA; tureen's own `torch>=2.3` is then satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
RUN pip install . && python -c "import tureen, tureen_client"

# ---- runtime: the environment only, as a non-root user -------------------------------------------
FROM base AS runtime
ARG TUREEN_UID=10001
RUN groupadd --system --gid "${TUREEN_UID}" tureen \
    && useradd --system --uid "${TUREEN_UID}" --gid tureen --home-dir /var/lib/tureen --shell /usr/sbin/nologin tureen \
    && mkdir -p /var/lib/tureen/store /var/lib/tureen/cache \
    && chown -R tureen:tureen /var/lib/tureen
COPY --from=build /opt/tureen /opt/tureen
ENV PATH=/opt/tureen/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/tureen \
    XDG_CACHE_HOME=/var/lib/tureen/cache \
    TUREEN_STORE=/var/lib/tureen/store
USER ${TUREEN_UID}:${TUREEN_UID}
WORKDIR /var/lib/tureen
EXPOSE 8000 8001 8002
ENTRYPOINT ["tureen", "serve"]
CMD ["--demo"]
