#!/usr/bin/env bash
# Everything only a GPU can show, in one command, on a lent H100/H200, from the source tree.
# Like bench/run_gpu.sh: nothing is installed (the machine's python, torch and triton, with the
# repository root on PYTHONPATH) and TRITON_INTERPRET is unset (compiled kernels).
#
#   bash bench/gpu_check.sh                 # on a GPU: bench/results/gpu-check-<gpu>-<date>/
#   bash bench/gpu_check.sh --out DIR       # results elsewhere
#   bash bench/gpu_check.sh --dry-run       # CPU interpreter, tiny sizes (automatic without CUDA)
#   bash bench/gpu_check.sh --only masks,kernels   # a subset (e.g. to rerun a failed step)
#
# Each step is `timeout <secs> python -m bench.gpu_check <step> --out DIR [--dry-run]`, run one
# after another; a failed or timed-out step does not stop the next. Every step's status (ok, FAIL,
# TIMEOUT, with rc and seconds) goes to DIR/summary.md and DIR/summary.json, its output to
# DIR/<step>.log and its measurements to DIR/<step>.json. Exit status: 1 if any step failed.
set -uo pipefail  # no -e: a failing step must not stop the others

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
OUT=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --only) ONLY="${2:?--only needs a comma-separated list of steps}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR, --only STEPS)" >&2; exit 2 ;;
  esac
  shift
done

# python: as bench/run_gpu.sh ($PYTHON or python3; .venv's if its torch sees CUDA). Without CUDA
# the run is a dry run, and then .venv's python (the pinned deps) is preferred unless $PYTHON is set.
PY="${PYTHON:-python3}"
VENV_PY="$ROOT/.venv/bin/python"
has_cuda() { "$1" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ -x "$VENV_PY" ] && has_cuda "$VENV_PY"; then
  PY="$VENV_PY"
fi
if [ "$DRY" = 0 ] && ! has_cuda "$PY"; then
  DRY=1
  [ -z "${PYTHON:-}" ] && [ -x "$VENV_PY" ] && PY="$VENV_PY"
  echo "bench/gpu_check.sh: no CUDA device visible to torch: dry run (CPU interpreter, tiny sizes) with $PY" >&2
elif [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x "$VENV_PY" ]; then
  PY="$VENV_PY"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export M2PO_GPU_CHECK=1  # tests/test_gpu_check.py skips itself inside a run of this script
DRYFLAG=()
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1    # set before any kernel module is imported (every step is a new process)
  export CUDA_VISIBLE_DEVICES=""  # a dry run on a GPU machine behaves as on a CPU one
  DRYFLAG=(--dry-run)
  MODE="dry-run"
else
  unset TRITON_INTERPRET       # compiled kernels, never the interpreter
  MODE="gpu"
fi

if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/m2po-gpu-check-dry-XXXXXX")"
  else
    SLUG="$("$PY" -c "import re,torch; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")"
    OUT="$ROOT/bench/results/gpu-check-${SLUG:-gpu}-$(date +%F)"
  fi
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"

# Per-step limits (seconds) on a GPU, compiles included: env 10 + nvidia-smi 2 x 5 + 110 + 35 + 50
# + 45 + 95 = 355 s, plus ~5 s of preamble (CUDA probe, GPU name) = the 6-minute budget. A fresh
# machine has a cold Triton cache: ~10 kernels per variant/dtype/mode, a few seconds each; the
# first step that meets a configuration compiles it, later steps load it from the on-disk cache.
# Estimates (16 cores, H100; python + torch import + CUDA init ~5 s per step):
#   env 10        versions (then nvidia-smi, 5 s limit per call)
#   tests 110     pytest collection ~10 s + compiling fp32 paper/official in the tests' modes
#                 (~30 compiles, ~60 s at 2 s each) + the tests (small sizes)
#   histogram 35  two 16M-token batches built on the CPU (~2 s each) + 4 x (stats pass, 2 full calls)
#   masks 50      bf16 and mask-only variants compile here (~10-20 s) + 96 mask calls at 1M tokens
#   kernels 45    three sizes x two regimes: profiler start-up (~5 s), 3 warm-up + 4 x 20 timed calls
#   bench 95      bench.run --quick: torch.compile of the `compiled` competitor (cold inductor,
#                 ~30-60 s) + 6 inputs x 9 competitors (~0.5 s each); the riskiest limit: if it
#                 times out, rerun with --only bench and GPU_CHECK_LIMITS=bench=200
# GPU_CHECK_LIMITS="bench=200,tests=150" overrides limits. Dry run: generous limits (a hang must
# not stall `make test`); it measured ~45 s in all on 2 cores.
STEPS=(tests histogram masks kernels bench)
if [ -n "$ONLY" ]; then
  IFS=, read -r -a WANT <<< "$ONLY"
  for s in "${WANT[@]}"; do
    case " ${STEPS[*]} " in *" $s "*) ;; *) echo "bench/gpu_check.sh: unknown step $s (steps: ${STEPS[*]})" >&2; exit 2 ;; esac
  done
  STEPS=("${WANT[@]}")
fi
if [ "$DRY" = 1 ]; then
  declare -A LIMIT=([env]=60 [tests]=150 [histogram]=90 [masks]=120 [kernels]=90 [bench]=90)
else
  declare -A LIMIT=([env]=10 [tests]=110 [histogram]=35 [masks]=50 [kernels]=45 [bench]=95)
fi
if [ -n "${GPU_CHECK_LIMITS:-}" ]; then
  IFS=, read -r -a PAIRS <<< "$GPU_CHECK_LIMITS"
  for kv in "${PAIRS[@]}"; do
    k="${kv%%=*}"; v="${kv#*=}"
    if [ -n "${LIMIT[$k]+x}" ] && [[ "$v" =~ ^[0-9]+$ ]]; then LIMIT[$k]=$v
    else echo "bench/gpu_check.sh: ignoring GPU_CHECK_LIMITS entry '$kv' (want step=seconds)" >&2; fi
  done
fi

echo "bench/gpu_check.sh ($MODE): results in $OUT"
echo "checks this script runs on a GPU:"
"$PY" -m bench.gpu_check list || {
  echo "  (python -m bench.gpu_check list failed)"; for s in "${STEPS[@]}"; do echo "  $s"; done; }
[ "$DRY" = 1 ] && echo "DRY RUN (CPU interpreter): every step runs its GPU code path at a tiny size on CPU tensors"

now_ms() { date +%s%3N; }
T_START=$(now_ms)

# env.txt: versions (python) and, on a GPU, nvidia-smi. Not a step: it never fails the run.
timeout -k 5 "${LIMIT[env]}" "$PY" -m bench.gpu_check env --out "$OUT" ${DRYFLAG[@]+"${DRYFLAG[@]}"} \
  || echo "versions: python -m bench.gpu_check env failed" >> "$OUT/env.txt"
if [ "$DRY" = 0 ]; then
  { echo; echo "## nvidia-smi"; timeout 5 nvidia-smi 2>&1 || echo "(nvidia-smi failed)"
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  } >> "$OUT/env.txt"
fi

json_str() { local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"; }

declare -A STATUS RC SECS HEAD
FAILED=0
for step in "${STEPS[@]}"; do
  rm -f "$OUT/$step.json"  # no stale result if this run's step dies before writing one
  echo "" >&2
  echo "=== $step (limit ${LIMIT[$step]} s) ===" >&2
  t0=$(now_ms)
  timeout -k 10 "${LIMIT[$step]}" "$PY" -m bench.gpu_check "$step" --out "$OUT" ${DRYFLAG[@]+"${DRYFLAG[@]}"} 2>&1 \
    | tee "$OUT/$step.log"
  rc=${PIPESTATUS[0]}
  SECS[$step]=$(awk -v ms=$(( $(now_ms) - t0 )) 'BEGIN { printf "%.1f", ms / 1000 }')
  RC[$step]=$rc
  if [ "$rc" = 0 ]; then
    STATUS[$step]=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    STATUS[$step]=TIMEOUT; FAILED=1
  else
    STATUS[$step]=FAIL; FAILED=1
  fi
  HEAD[$step]="$(grep '^RESULT ' "$OUT/$step.log" | tail -n 1 | sed 's/^RESULT [a-z]*: [A-Za-z]*: //')"
  [ "${STATUS[$step]}" = TIMEOUT ] && HEAD[$step]="timed out after ${LIMIT[$step]} s (see $step.log)"
  echo "--- $step: ${STATUS[$step]} (rc ${RC[$step]}, ${SECS[$step]} s)" >&2
done
TOTAL=$(awk -v ms=$(( $(now_ms) - T_START )) 'BEGIN { printf "%.1f", ms / 1000 }')

# summary.md and summary.json
{
  echo "# bench/gpu_check.sh: $MODE, $(date -u +%FT%TZ)"
  echo
  echo "Results folder: \`$OUT\`; total ${TOTAL} s. Versions: env.txt. Per step: <step>.log (output), <step>.json."
  echo
  echo "| step | status | rc | seconds | limit | result |"
  echo "|---|---|---|---|---|---|"
  for step in "${STEPS[@]}"; do
    echo "| $step | ${STATUS[$step]} | ${RC[$step]} | ${SECS[$step]} | ${LIMIT[$step]} | ${HEAD[$step]//|/\\|} |"
  done
} > "$OUT/summary.md"
{
  printf '{\n  "mode": "%s",\n  "out": %s,\n  "created": "%s",\n  "total_s": %s,\n  "ok": %s,\n  "steps": [\n' \
    "$MODE" "$(json_str "$OUT")" "$(date -u +%FT%TZ)" "$TOTAL" "$([ "$FAILED" = 0 ] && echo true || echo false)"
  sep=""
  for step in "${STEPS[@]}"; do
    printf '%s    {"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "result": %s, "log": "%s.log", "json": %s}' \
      "$sep" "$step" "${STATUS[$step]}" "${RC[$step]}" "${SECS[$step]}" "${LIMIT[$step]}" "$(json_str "${HEAD[$step]}")" \
      "$step" "$([ -f "$OUT/$step.json" ] && echo "\"$step.json\"" || echo null)"
    sep=$',\n'
  done
  printf '\n  ]\n}\n'
} > "$OUT/summary.json"

echo
cat "$OUT/summary.md"
echo
echo "bench/gpu_check.sh: $([ "$FAILED" = 0 ] && echo "all steps ok" || echo "SOME STEPS FAILED") in ${TOTAL} s; results in $OUT"
exit "$FAILED"
