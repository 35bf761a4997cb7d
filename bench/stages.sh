# The stage runner of bench/gpu_check.sh and bench/cpu_check.sh (sourced, not run). The caller sets LOG_DIR
# (one log per stage goes there) and START (its $SECONDS at the start).
SUMMARY=()
FAILED=0

# stage NAME CAP_SECONDS COMMAND...: runs the command under a time cap, its output shown and logged.
stage() {
  local name="$1" cap="$2" begin=$SECONDS rc=0
  shift 2
  echo
  echo "== $name ($((SECONDS - START)) s)"
  timeout "$cap" bash -c '"$@"' stage "$@" 2>&1 | tee "$LOG_DIR/${name//[^A-Za-z0-9]/_}.log"
  rc=${PIPESTATUS[0]}
  local status="ok"
  if [ "$rc" -eq 124 ]; then status="TIMEOUT (${cap} s)"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
  if [ "$rc" -ne 0 ]; then FAILED=1; fi
  SUMMARY+=("$(printf '%-34s %6d s  %s' "$name" $((SECONDS - begin)) "$status")")
  return "$rc"
}

# print_summary TITLE: the table of stages run so far.
print_summary() {
  echo
  echo "== $1 summary ($((SECONDS - START)) s in all; logs in $LOG_DIR)"
  printf '%-34s %8s  %s\n' "stage" "time" "result"
  printf '%s\n' "${SUMMARY[@]}"
}
