# loraforge on CPU: the same Python, torch wheel and pins as CI (docker/install.sh is what `make venv` runs).
# Use it for the Ray head, CPU workers, and the embedded default without a GPU.
#
#   docker build -f docker/cpu.Dockerfile -t loraforge-cpu .
#   docker run --rm loraforge-cpu loraforge --help
FROM python:3.11-slim-bookworm

# Java runs the E2E metrics' METEOR and PTB tokenizer jars (pycocoevalcap); g++ builds DeepSpeed's
# CPU Adam the first time ZeRO-3 + CPU offload runs; git records the submitted tree's commit.
# Debian's security updates replace exact versions, so these follow bookworm instead of pinning them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless g++ git procps \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1

RUN useradd --create-home --uid 1000 --shell /bin/bash loraforge \
    && python -m venv /opt/venv \
    && chown -R loraforge:loraforge /opt/venv
WORKDIR /app
COPY --chown=loraforge:loraforge . /app
USER 1000
RUN docker/install.sh /opt/venv/bin/python memory,eval,server

# A Ray node in this container answers `ray health-check` while its raylet and GCS connection are up;
# a container that only runs the CLI has no Ray node and reports unhealthy, which stops nothing.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["ray", "health-check"]
CMD ["loraforge", "--help"]
