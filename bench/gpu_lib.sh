# Sourced by bench/gpu_visit.sh and bench/gpu_kernels.sh (not run on its own): a wall-clock budget, steps that
# each get `timeout -k 15 --signal=INT` within it and a full log under $OUT, and $OUT/summary.md written one row
# per finished step, so a run killed from outside still returns what finished. The device tool returns at most
# 8 files from $OUT, flat names only (/work/.library/device/README.md, Limits).
#
#   gpu_init BUDGET_S      start the clock; steps end by T0 + BUDGET_S - GPU_RESERVE_S (default 15 s, for the end)
#   gpu_note TEXT          a line under the summary's header
#   gpu_step NAME MIN_S MAX_S CMD...   run CMD when MIN_S seconds are still left, for at most MAX_S (and never
#                          past the end); log $OUT/NAME.log (or $GPU_LOGDIR/NAME.log); OK_RCS="0 3" (the
#                          variable, for this step only) names the exit codes that count as done, SKIP_RCS
#                          those that mean the step found nothing to do here (e.g. no disk for it)
#   gpu_finish             print the summary; exit 0 when every step was done, 1 when one failed, 2 when one was
#                          cut or skipped by the budget
# CMD may be a shell function of the calling script (run as it is, without a timeout: keep it short).
# Statuses: done, FAILED (exit N), cut by the budget (SIGINT after N s: the step printed what it had), KILLED (still
# running 15 s after the SIGINT), skipped (N s left, needs M).

gpu_init() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] || { echo "error: budget must be whole seconds, got '${1:-}'" >&2; exit 64; }
  OUT=${OUT:-/tmp/gpu-out}
  mkdir -p "$OUT"
  GPU_T0=$(date +%s)
  GPU_END=$((GPU_T0 + $1 - ${GPU_RESERVE_S:-15}))
  GPU_FAILED=0 GPU_INCOMPLETE=0
  GPU_SUMMARY=$OUT/summary.md
  GPU_PARTS=$(mktemp -d)  # head (title, notes), rows (the table), tails (ends of the logs of steps not done)
  printf '# %s, %s UTC, budget %s s\n\n' "$(basename "$0") ${GPU_ARGS:-}" "$(date -u '+%Y-%m-%d %H:%M')" "$1" \
    > "$GPU_PARTS/head"
  : > "$GPU_PARTS/rows"
  : > "$GPU_PARTS/tails"
  : > "$GPU_PARTS/foot"
  gpu_write
  trap 'gpu_row "(the script)" "interrupted by a signal at $(( $(date +%s) - GPU_T0 )) s" "-" "-"; GPU_FAILED=1; gpu_finish' INT TERM
}

gpu_write() {  # summary.md from its parts, after every change (a killed run keeps what was written)
  { cat "$GPU_PARTS/head"
    printf '\n| step | status | s | log |\n|---|---|---|---|\n'
    cat "$GPU_PARTS/rows"
    [ -s "$GPU_PARTS/tails" ] && printf '\nEnds of the logs of the steps not done:\n\n' && cat "$GPU_PARTS/tails"
    cat "$GPU_PARTS/foot"
  } > "$GPU_SUMMARY.tmp" && mv "$GPU_SUMMARY.tmp" "$GPU_SUMMARY"
}

gpu_left() { echo $((GPU_END - $(date +%s))); }

gpu_note() { printf '%s\n' "$*" | tee -a "$GPU_PARTS/head"; gpu_write; }

gpu_row() {  # NAME STATUS SECONDS LOG
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$GPU_PARTS/rows"
  gpu_write
  echo "[$(( $(date +%s) - GPU_T0 )) s] $1: $2"
}

gpu_tail() {  # NAME LOG: the last lines of a step's log into the summary (and the device tool's output tail)
  { echo "$1 ($(basename "$2")):"; tail -n 4 "$2" | cut -c1-300 | sed 's/^/    /'; } | tee -a "$GPU_PARTS/tails"
  gpu_write
}

gpu_step() {
  local name=$1 min=$2 max=$3 ok=" ${OK_RCS:-0} " skip=" ${SKIP_RCS:-} " left limit t rc status log
  shift 3
  log=${GPU_LOGDIR:-$OUT}/$name.log
  left=$(gpu_left)
  if [ "$left" -lt "$min" ]; then
    gpu_row "$name" "skipped ($left s left, needs $min)" 0 "-"
    GPU_INCOMPLETE=1
    return 0
  fi
  limit=$(( max < left ? max : left ))
  t=$(date +%s)
  echo "[$(( t - GPU_T0 )) s] $name: start, limit $limit s: $*"
  if declare -F "$1" > /dev/null; then  # a shell function of the script: no timeout, keep it short
    "$@" > "$log" 2>&1
  else
    timeout -k 15 --signal=INT "$limit" "$@" > "$log" 2>&1
  fi
  rc=$?
  t=$(( $(date +%s) - t ))
  if [[ "$ok" == *" $rc "* ]]; then status="done$([ "$rc" = 0 ] || echo " (exit $rc, expected here)")"
  elif [[ "$skip" == *" $rc "* ]]; then status="skipped (exit $rc: its log says why)"; GPU_INCOMPLETE=1
  elif [ "$rc" = 124 ]; then status="cut by the budget (SIGINT after $limit s)"; GPU_INCOMPLETE=1
  elif [ "$rc" = 137 ]; then status="KILLED (still running 15 s after SIGINT at $limit s)"; GPU_FAILED=1
  else status="FAILED (exit $rc)"; GPU_FAILED=1
  fi
  gpu_row "$name" "$status" "$t" "$(basename "$log")"
  [[ "$status" == done* ]] || gpu_tail "$name" "$log"
  return 0
}

gpu_finish() {
  trap - INT TERM
  local code=0
  [ "$GPU_INCOMPLETE" = 1 ] && code=2
  [ "$GPU_FAILED" = 1 ] && code=1
  printf '\nwall %s s; exit %s (0 all done, 1 a step failed, 2 a step cut or skipped by the budget)\n' \
    "$(( $(date +%s) - GPU_T0 ))" "$code" >> "$GPU_PARTS/foot"
  gpu_write
  rm -rf "$GPU_PARTS"
  echo "==== $GPU_SUMMARY"
  cat "$GPU_SUMMARY"
  exit "$code"
}
