# Shared by bench/serve_bench.sh, bench/serve_kv_table.sh and bench/lm_eval_check.sh (sourced,
# not run): the machine line of a run's env.txt, the pare binary to run, and one background
# server on $PORT at a time.

machine_line() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
}

# PARE=path/to/pare skips the build; otherwise build and run a copy of the release binary.
pare_binary() {
  if [[ -z ${PARE:-} ]]; then
    cargo build --release --locked -p pare-cli >&2
    # A copy: another checkout sharing CARGO_TARGET_DIR may rebuild target/release/pare mid-run.
    PARE=$(mktemp -d)/pare
    cp "${CARGO_TARGET_DIR:-target}/release/pare" "$PARE"
  fi
}

SERVER_PID=
stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap stop_server EXIT

# start_server LOG CMD...: run it in the background; return once /health answers 200.
start_server() {
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then return; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited: $(tail -3 "$log")" >&2; exit 1; }
    sleep 0.5
  done
  echo "server not healthy after 300 s: $(tail -3 "$log")" >&2
  exit 1
}
