#!/usr/bin/env bash
# Everything only a GPU can show, in one command, on a lent H100/H200, from the source tree.
# Like bench/run_gpu.sh: nothing is installed (the machine's python, torch and triton, with the
# repository root on PYTHONPATH) and TRITON_INTERPRET is unset (compiled kernels).
#
#   bash bench/gpu_check.sh                 # on a GPU: bench/results/gpu-check-<gpu>-<date>/
#   bash bench/gpu_check.sh --out DIR       # results elsewhere
#   bash bench/gpu_check.sh --dry-run       # CPU interpreter, tiny sizes (automatic without CUDA)
#   bash bench/gpu_check.sh --only masks,kernels   # a subset (e.g. to rerun a failed step)
#   bash bench/gpu_check.sh --out /tmp/gc --tar "$OUT/gpu-check.tar.gz"
#       # also packs the results folder into that .tar.gz and copies summary.md beside it as
#       # $OUT/gpu-check.summary.md: two files, for a machine that returns only a few
#
# Each step is `timeout <secs> python -m bench.gpu_check <step> --out DIR [--dry-run]`, run one
# after another; a failed or timed-out step does not stop the next. The whole run, preamble
# included, ends within GPU_CHECK_BUDGET seconds (default 360) of its start: every timeout is
# capped at what is left of that budget (minus the 5 s kill grace and 2 s kept for the summary and
# the tarball), and a step with less than 5 s left is not started (SKIPPED, a failure). Every step's status (ok, FAIL, TIMEOUT, SKIPPED, with
# rc and seconds) goes to DIR/summary.md and DIR/summary.json, its output to DIR/<step>.log and its
# result to DIR/<step>.json. Exit status: 1 if any step failed or was skipped (2: bad arguments).
set -uo pipefail  # no -e: a failing step must not stop the others

now_ms() { date +%s%3N; }
T_START=$(now_ms)  # the budget counts from here
CALLER_PWD="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER_PWD" "$1" ;; esac; }

DRY=0
OUT=""
ONLY=""
TAR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --only) ONLY="${2:?--only needs a comma-separated list of steps}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --tar) TAR="${2:?--tar needs a file name (.tar.gz)}"; shift ;;
    --tar=*) TAR="${1#--tar=}" ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR, --only STEPS, --tar FILE)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$OUT" ] && OUT="$(abspath "$OUT")"  # relative to where the script was called from
[ -n "$TAR" ] && TAR="$(abspath "$TAR")"

BUDGET="${GPU_CHECK_BUDGET:-360}"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "bench/gpu_check.sh: GPU_CHECK_BUDGET must be whole seconds, not '$BUDGET'" >&2; exit 2
fi
GRACE=5     # timeout -k: seconds between SIGTERM and SIGKILL
MIN_STEP=5  # a step with less left than this is not started (python + torch import alone take ~3 s)
WRAPUP=2    # kept for summary.md/json and the tarball after the last step
DEADLINE_MS=$(( T_START + (BUDGET - WRAPUP) * 1000 ))  # every process started here is gone by then
# cap LIMIT: the timeout to use now, min(LIMIT, seconds left of the budget - GRACE) (may be <= 0)
cap() { local left=$(( (DEADLINE_MS - $(now_ms)) / 1000 - GRACE )); echo $(( left < $1 ? left : $1 )); }
left_s() { echo $(( (T_START + BUDGET * 1000 - $(now_ms)) / 1000 )); }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export M2PO_GPU_CHECK=1  # tests/test_gpu_check.py skips itself inside a run of this script

# python: as bench/run_gpu.sh ($PYTHON or python3; .venv's if its torch sees CUDA). Without CUDA
# the run is a dry run, and then .venv's python (the pinned deps) is preferred unless $PYTHON is set.
# One python start per candidate (`bench.gpu_check probe`: torch import and CUDA init once, the
# GPU's name and the list of steps), under the budget's timeout; an explicit --dry-run probes nothing.
PY="${PYTHON:-python3}"
VENV_PY="$ROOT/.venv/bin/python"
PROBE_LIMIT=30  # torch import + CUDA init: ~3-5 s, more on a cold machine
LISTING=""
SLUG=""
if [ "$DRY" = 0 ]; then
  CANDIDATES=()
  [ -x "$VENV_PY" ] && CANDIDATES+=("$VENV_PY")
  [ "$PY" != "$VENV_PY" ] && CANDIDATES+=("$PY")
  FOUND=0
  PROBE_ERR="$(mktemp "${TMPDIR:-/tmp}/m2po-gpu-check-probe-XXXXXX")"
  for cand in ${CANDIDATES[@]+"${CANDIDATES[@]}"}; do
    t=$(cap $PROBE_LIMIT)
    if [ "$t" -lt 1 ]; then echo "bench/gpu_check.sh: no time left to probe $cand" >&2; break; fi
    probe="$(timeout -k "$GRACE" "$t" "$cand" -m bench.gpu_check probe 2>"$PROBE_ERR")"
    prc=$?
    first="${probe%%$'\n'*}"
    [[ "$probe" == *$'\n'* ]] && LISTING="${probe#*$'\n'}"
    if [ "$prc" = 0 ] && [[ "$first" == "cuda "* ]]; then
      PY="$cand"; SLUG="${first#cuda }"; FOUND=1; tail -n 1 "$PROBE_ERR" >&2; break
    elif [ "$prc" = 124 ] || [ "$prc" = 137 ]; then
      echo "bench/gpu_check.sh: probing $cand timed out after $t s" >&2
    elif [ "$prc" != 0 ]; then
      echo "bench/gpu_check.sh: probing $cand failed (rc $prc): $(tail -n 1 "$PROBE_ERR")" >&2
    fi
  done
  rm -f "$PROBE_ERR"
  if [ "$FOUND" = 0 ]; then
    DRY=1
    [ -z "${PYTHON:-}" ] && [ -x "$VENV_PY" ] && PY="$VENV_PY"
    echo "bench/gpu_check.sh: no CUDA device visible to torch: dry run (CPU interpreter, tiny sizes) with $PY" >&2
  fi
elif [ -z "${PYTHON:-}" ] && [ -x "$VENV_PY" ]; then
  PY="$VENV_PY"
fi

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
    OUT="$ROOT/bench/results/gpu-check-${SLUG:-gpu}-$(date +%F)"
  fi
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"

# Per-step limits (seconds) on a GPU, compiles included, each capped by what is left of the budget:
# probe 30, env 10, nvidia-smi 2 x 5, tests 150, histogram 35, masks 60, kernels 45, bench 95
# add up to more than the 360 s budget on purpose: they are ceilings, and the expected times
# (~5 + 4 + 1 + 115 + 25 + 45 + 35 + 70 = ~300 s) leave room. The later a step, the more a slow
# earlier one squeezes it (bench last: the riskiest). A fresh machine has a cold Triton cache:
# ~10 kernels per variant/dtype/mode, a few seconds each; the first step that meets a
# configuration compiles it, later steps load it from the on-disk cache.
# Estimates (16 cores, H100; python + torch import + CUDA init ~5 s per step):
#   env 10        versions (then nvidia-smi, 5 s limit per call)
#   tests 150     pytest -m gpu: collection ~10 s + compiling fp32 paper/official in the tests'
#                 modes (~30 compiles, ~60 s at 2 s each) + the tests (small sizes) + torch.compile
#                 of a small training step, Inductor then reduce-overhead (~20-30 s, an estimate);
#                 then the official bit-identity test (a second pytest start, miniclip compiles)
#   histogram 35  two 16M-token batches built on the CPU (~2 s each) + 4 x (stats pass, 2 full calls)
#   masks 60      bf16 and mask-only variants compile here (~10-20 s) + 48 cases at 1M tokens, each
#                 mask + loss/backward on both backends
#   kernels 45    three sizes x two regimes: profiler start-up (~5 s), 3 warm-up + 4 x 20 timed calls
#   bench 95      bench.run --quick: torch.compile of the `compiled` competitor (cold inductor,
#                 ~30-60 s) + 6 inputs x 9 competitors (~0.5 s each); the riskiest limit: if it
#                 times out, rerun with --only bench and GPU_CHECK_LIMITS=bench=200
# GPU_CHECK_LIMITS="bench=200,tests=150" overrides limits (GPU_CHECK_BUDGET the total). Dry run:
# generous limits (a hang must not stall `make test`); it measured ~45-50 s in all on 2 cores.
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
  declare -A LIMIT=([env]=10 [tests]=150 [histogram]=35 [masks]=60 [kernels]=45 [bench]=95)
fi
if [ -n "${GPU_CHECK_LIMITS:-}" ]; then
  IFS=, read -r -a PAIRS <<< "$GPU_CHECK_LIMITS"
  for kv in "${PAIRS[@]}"; do
    k="${kv%%=*}"; v="${kv#*=}"
    if [ -n "${LIMIT[$k]+x}" ] && [[ "$v" =~ ^[0-9]+$ ]]; then LIMIT[$k]=$v
    else echo "bench/gpu_check.sh: ignoring GPU_CHECK_LIMITS entry '$kv' (want step=seconds)" >&2; fi
  done
fi

echo "bench/gpu_check.sh ($MODE): results in $OUT; budget ${BUDGET} s (GPU_CHECK_BUDGET)"
echo "checks this script runs on a GPU:"
if [ -z "$LISTING" ]; then  # a dry run: `list` imports no torch (~0.1 s)
  t=$(cap 20)
  [ "$t" -ge 1 ] && LISTING="$(timeout -k "$GRACE" "$t" "$PY" -m bench.gpu_check list)"
fi
if [ -n "$LISTING" ]; then
  printf '%s\n' "$LISTING"
else
  echo "  (python -m bench.gpu_check list failed or had no time)"; for s in "${STEPS[@]}"; do echo "  $s"; done
fi
[ "$DRY" = 1 ] && echo "DRY RUN (CPU interpreter): every step runs its GPU code path at a tiny size on CPU tensors"

# env.txt: versions (python) and, on a GPU, nvidia-smi. Not a step: it never fails the run.
t=$(cap "${LIMIT[env]}")
if [ "$t" -ge "$MIN_STEP" ]; then
  timeout -k "$GRACE" "$t" "$PY" -m bench.gpu_check env --out "$OUT" ${DRYFLAG[@]+"${DRYFLAG[@]}"} \
    || echo "versions: python -m bench.gpu_check env failed or timed out (limit $t s)" >> "$OUT/env.txt"
else
  echo "versions: not collected ($(left_s) s left of the ${BUDGET} s budget)" > "$OUT/env.txt"
fi
if [ "$DRY" = 0 ]; then
  { echo; echo "## nvidia-smi"
    t=$(cap 5); if [ "$t" -ge 1 ]; then timeout -k 2 "$t" nvidia-smi 2>&1 || echo "(nvidia-smi failed)"; fi
    t=$(cap 5); if [ "$t" -ge 1 ]; then
      timeout -k 2 "$t" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    else echo "(skipped: no time left)"; fi
  } >> "$OUT/env.txt"
fi

json_str() { local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"; }

declare -A STATUS RC SECS HEAD TIMEOUT_S
FAILED=0
for step in "${STEPS[@]}"; do
  rm -f "$OUT/$step.json"  # no stale result if this run's step dies before writing one (or is skipped)
  echo "" >&2
  t=$(cap "${LIMIT[$step]}")
  if [ "$t" -lt "$MIN_STEP" ]; then
    left=$(left_s)
    STATUS[$step]=SKIPPED; RC[$step]=null; SECS[$step]=0.0; TIMEOUT_S[$step]=null; FAILED=1
    HEAD[$step]="not run: ${left} s left of the ${BUDGET} s budget (GPU_CHECK_BUDGET; a step needs ${MIN_STEP} s + ${GRACE} s kill grace + ${WRAPUP} s for the summary)"
    echo "SKIPPED: ${HEAD[$step]}" > "$OUT/$step.log"
    echo "=== $step: SKIPPED, ${HEAD[$step]} ===" >&2
    continue
  fi
  TIMEOUT_S[$step]=$t
  echo "=== $step (limit ${LIMIT[$step]} s$([ "$t" -lt "${LIMIT[$step]}" ] && echo ", capped at $t s by the budget")) ===" >&2
  t0=$(now_ms)
  timeout -k "$GRACE" "$t" "$PY" -m bench.gpu_check "$step" --out "$OUT" ${DRYFLAG[@]+"${DRYFLAG[@]}"} 2>&1 \
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
  [ "${STATUS[$step]}" = TIMEOUT ] && HEAD[$step]="timed out after $t s$([ "$t" -lt "${LIMIT[$step]}" ] && echo " (limit ${LIMIT[$step]} s, capped by the ${BUDGET} s budget)") (see $step.log)"
  echo "--- $step: ${STATUS[$step]} (rc ${RC[$step]}, ${SECS[$step]} s)" >&2
done
TOTAL=$(awk -v ms=$(( $(now_ms) - T_START )) 'BEGIN { printf "%.1f", ms / 1000 }')

# summary.md and summary.json (summary.md also beside the tarball with --tar)
if [ -n "$TAR" ]; then
  case "$(basename "$TAR")" in
    *.tar.gz) TAR_BASE="${TAR%.tar.gz}" ;;
    *.tgz) TAR_BASE="${TAR%.tgz}" ;;
    *.*) TAR_BASE="${TAR%.*}" ;;
    *) TAR_BASE="$TAR" ;;
  esac
  SUMMARY_COPY="$TAR_BASE.summary.md"
fi
{
  echo "# bench/gpu_check.sh: $MODE, $(date -u +%FT%TZ)"
  echo
  echo "Results folder: \`$OUT\`; total ${TOTAL} s of a ${BUDGET} s budget (from the script's start). Versions: env.txt. Per step: <step>.log (output), <step>.json."
  [ -n "$TAR" ] && { echo; echo "Packed into \`$TAR\` (this file beside it: \`$(basename "$SUMMARY_COPY")\`)."; }
  echo
  echo "| step | status | rc | seconds | timeout | result |"
  echo "|---|---|---|---|---|---|"
  for step in "${STEPS[@]}"; do
    to="${TIMEOUT_S[$step]}"
    if [ "$to" = null ]; then to="- (limit ${LIMIT[$step]})"
    elif [ "$to" -lt "${LIMIT[$step]}" ]; then to="$to (limit ${LIMIT[$step]})"; fi
    echo "| $step | ${STATUS[$step]} | ${RC[$step]/null/-} | ${SECS[$step]} | $to | ${HEAD[$step]//|/\\|} |"
  done
} > "$OUT/summary.md"
{
  printf '{\n  "mode": "%s",\n  "out": %s,\n  "created": "%s",\n  "total_s": %s,\n  "budget_s": %s,\n  "ok": %s,\n  "steps": [\n' \
    "$MODE" "$(json_str "$OUT")" "$(date -u +%FT%TZ)" "$TOTAL" "$BUDGET" "$([ "$FAILED" = 0 ] && echo true || echo false)"
  sep=""
  for step in "${STEPS[@]}"; do
    printf '%s    {"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "limit_s": %s, "result": %s, "log": "%s.log", "json": %s}' \
      "$sep" "$step" "${STATUS[$step]}" "${RC[$step]}" "${SECS[$step]}" "${TIMEOUT_S[$step]}" "${LIMIT[$step]}" \
      "$(json_str "${HEAD[$step]}")" "$step" "$([ -f "$OUT/$step.json" ] && echo "\"$step.json\"" || echo null)"
    sep=$',\n'
  done
  printf '\n  ]\n}\n'
} > "$OUT/summary.json"

echo
cat "$OUT/summary.md"
echo
echo "bench/gpu_check.sh: $([ "$FAILED" = 0 ] && echo "all steps ok" || echo "SOME STEPS FAILED OR WERE SKIPPED") in ${TOTAL} s; results in $OUT"

# --tar FILE: the whole results folder as FILE (.tar.gz, built aside and moved into place, so a
# FILE inside the folder is neither half-written nor packed into itself) + summary.md beside it
if [ -n "$TAR" ]; then
  TMP_TAR="$(mktemp "${TMPDIR:-/tmp}/m2po-gpu-check-tar-XXXXXX")"
  if mkdir -p "$(dirname "$TAR")" \
     && tar -czf "$TMP_TAR" --exclude="$(basename "$TAR")" --exclude="$(basename "$SUMMARY_COPY")" \
          -C "$(dirname "$OUT")" "$(basename "$OUT")" \
     && mv -f "$TMP_TAR" "$TAR" && cp "$OUT/summary.md" "$SUMMARY_COPY"; then
    echo "bench/gpu_check.sh: packed $OUT into $TAR ($(du -k "$TAR" | cut -f1) KiB), summary in $SUMMARY_COPY"
  else
    rm -f "$TMP_TAR"
    echo "bench/gpu_check.sh: packing $OUT into $TAR FAILED" >&2
    FAILED=1
  fi
fi
exit "$FAILED"
