#!/usr/bin/env bash
# Install the project's Python requirements without replacing a torch that is already installed.
#   bash requirements/install.sh          runtime requirements
#   bash requirements/install.sh dev      runtime + test requirements
# torch: kept if importable. Otherwise: on a machine with an NVIDIA driver, the default (CUDA) build;
# on a machine without one, `torch==$TORCH_CPU_VERSION`, which must resolve to a CPU build on your index
# (this project's CI machines hold that CPU wheel locally). Set TORCH_SPEC to choose yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
PIP="python3 -m pip install -q --disable-pip-version-check"
if python3 -c "import torch" 2>/dev/null; then
  echo "torch $(python3 -c 'import torch; print(torch.__version__)') already installed: keeping it"
elif [ -n "${TORCH_SPEC:-}" ]; then
  $PIP "$TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1; then
  $PIP torch
else
  $PIP "torch==$TORCH_CPU_VERSION"
fi
if [ "${1:-}" = "dev" ]; then
  $PIP -r requirements/requirements-dev.txt
else
  $PIP -r requirements/requirements.txt
fi
