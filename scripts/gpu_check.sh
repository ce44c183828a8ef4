#!/usr/bin/env bash
# The GPU checks (scripts/gpu_check.py): CUDA vLLM colocated sampling + weight sync, the served
# teacher on GPU vLLM, a bf16 learner, NCCL with 2 processes when 2 GPUs exist; one line per check
# with its figure, a few minutes on one GPU. Run it whenever a GPU is at hand:
#
#     scripts/gpu_check.sh [bf16 colocated served nccl]
#
# The interpreter: $OPD_PYTHON, else .venv/bin/python (make install; pip install -e '.[vllm]' for
# the vLLM checks), else python3. Without a CUDA GPU it says so and exits 0.
set -u
cd "$(dirname "$0")/.."
PYTHON="${OPD_PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: torch does not import with $PYTHON: make install, or set OPD_PYTHON to the project's interpreter"
    exit 1
fi
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False with $PYTHON): nothing checked"
    exit 0
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
