#!/usr/bin/env bash
# The GPU checks of colocated mode and the learner on CUDA, without Ray or vLLM (their wheels are
# too big to carry to a lent GPU machine): torch, transformers, peft, pydantic, safetensors,
# pyyaml and pyarrow are enough. About a minute on one H100/H200; see scripts/gpu_check.py for what
# each check compares and its tolerance. Exit code: the number of failed checks.
#
#   bash scripts/gpu_check.sh              # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry-run    # every check on the CPU, Ray and vLLM unimportable (CI)
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Where rlfleet
# is not installed, the repository's folders are put on the path as the `rlfleet` namespace.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
if ! "$python" -c "import rlfleet.learner" 2>/dev/null; then
  shim="$(mktemp -d)"
  trap 'rm -rf "$shim"' EXIT
  mkdir -p "$shim/rlfleet"
  for part in common learner rollout services weight_sync deploy; do ln -s "$root/$part" "$shim/rlfleet/$part"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$python" "$root/scripts/gpu_check.py" "$@"
