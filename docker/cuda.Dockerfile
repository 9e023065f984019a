# loraforge on NVIDIA GPUs: the pins of the CPU image with the CUDA build of the same torch version.
# The torch CUDA wheel ships the CUDA runtime, cuBLAS, cuDNN and NCCL as pip packages, so the base is
# plain Python; the NVIDIA container toolkit mounts the driver when the container asks for GPUs.
#
#   docker build -f docker/cuda.Dockerfile -t loraforge-cuda .
#   docker run --rm --gpus all loraforge-cuda python -c "import torch; print(torch.cuda.is_available())"
FROM python:3.11-slim-bookworm

# PyTorch's CUDA index; `torch==2.13.0` (the pin in pyproject.toml) there is the CUDA 12.8 build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# Java for the E2E metrics' jars, g++ for DeepSpeed's JIT-built CPU Adam (ZeRO-3 + CPU offload),
# git for the submitted tree's commit. These follow bookworm's security updates instead of pinning them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless g++ git procps \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --create-home --uid 1000 --shell /bin/bash loraforge \
    && python -m venv /opt/venv \
    && chown -R loraforge:loraforge /opt/venv
WORKDIR /app
COPY --chown=loraforge:loraforge . /app
USER 1000
# no GPU while the image builds: DeepSpeed's ops are JIT-built for CUDA on first use instead
RUN TORCH_INDEX_URL="$TORCH_INDEX_URL" LORAFORGE_BUILD_OPS=0 docker/install.sh /opt/venv/bin/python memory,eval,server

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["ray", "health-check"]
CMD ["loraforge", "--help"]
