#!/usr/bin/env bash
# The full GPU benchmark in one command, on a lent H100/H200, from the source tree.
# Nothing is installed: it uses the machine's own python, torch and triton, with the repository
# root on PYTHONPATH. Writes bench/results/<gpu>-<date>.{json,md,png}.
#
#   bash bench/run_gpu.sh            # full suite (32K..16M tokens, fp32+bf16, 3 regimes)
#   bash bench/run_gpu.sh --quick    # a smoke run (32K and 1M tokens)
#   extra arguments go to python -m bench.run (e.g. --sizes 1048576 --regimes typical)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/run_gpu.sh: no CUDA device visible to torch; on CPU use `make bench`")
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"not importable ({exc})"
print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}  triton {tv}",
      file=sys.stderr)
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec "$PY" -m bench.run --device cuda "$@"
