#!/usr/bin/env bash
# A multi-host run on one machine: P processes on 127.0.0.1, D virtual CPU devices each, gloo
# collectives, all running `python -m simclr_jax.main MAIN_ARGS`. This is how the tests exercise
# multi-host code paths without a cluster; see docs/launch.md.
#
#   launch/local_multiprocess.sh -n 2 -d 2 -- --config=configs/digits.py --workdir=runs/mh
#
# Exits 0 when every process succeeds; otherwise stops the others and exits with the status of
# the first process that failed. Each output line is prefixed with `[i] ` (process i).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES] [-p PORT] [-t TIMEOUT] -- MAIN_ARGS...

  -n PROCESSES  number of processes (default 2)
  -d DEVICES    virtual CPU devices per process (default 2)
  -p PORT       coordinator port on 127.0.0.1 (default: a free port)
  -t TIMEOUT    seconds allowed for jax.distributed.initialize (default 120)
  MAIN_ARGS     arguments of `python -m simclr_jax.main`, e.g. --config=... --workdir=...

environment: PYTHON (default: python), KILL_GRACE seconds between SIGTERM and SIGKILL when
stopping the other processes after a failure (default 5).
EOF
}

processes=2
devices=2
port=""
init_timeout=120
while getopts "n:d:p:t:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    t) init_timeout="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
for v in "$processes" "$devices" "$init_timeout"; do
  if ! [[ "$v" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: -n, -d and -t take positive integers, got '$v'" >&2
    exit 2
  fi
done

python_bin="${PYTHON:-python}"
kill_grace="${KILL_GRACE:-5}"
if [[ -z "$port" ]]; then
  # Ask the OS for a free port (another program could take it before process 0 binds it).
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # A process blocked in a collective with a dead peer ignores SIGTERM's graceful path.
  local waited=0
  while (( waited < kill_grace * 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

echo "launching $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port" >&2
for ((i = 0; i < processes; i++)); do
  # Process substitution keeps $! the Python process (not the prefixing filter), so it can be
  # waited on and killed; sed -u passes lines through as they come.
  # Last so that it overrides a device count already in XLA_FLAGS.
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
  JAX_PLATFORMS=cpu \
    "$python_bin" -u -m simclr_jax.main "$@" \
    --config.distributed.enabled=True \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$processes" \
    --config.distributed.process_id="$i" \
    --config.distributed.initialization_timeout="$init_timeout" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

# Poll rather than `wait -n`: the prefixing filters are children too, and the first failure
# must stop the others at once (survivors would otherwise block in collectives).
status=0
remaining=${#pids[@]}
declare -A done_pids=()
while (( remaining > 0 )); do
  for idx in "${!pids[@]}"; do
    pid="${pids[$idx]}"
    [[ -n "${done_pids[$pid]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if (( rc != 0 )); then
      echo "process $idx exited with status $rc; stopping the others" >&2
      status=$rc
      stop_all
      remaining=0
      break
    fi
  done
  if (( remaining > 0 )); then sleep 0.2; fi
done
# Let the prefixing filters flush their last lines.
wait 2>/dev/null || true
exit "$status"
