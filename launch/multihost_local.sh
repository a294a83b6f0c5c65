#!/usr/bin/env bash
# Tries a multi-host run on one machine: N local CPU processes of launch.main (default 2),
# joined by a coordinator on localhost (a free port), process i with --process_id=i, as
# the hosts of a GPU cluster or TPU pod would be.
#
#   bash launch/multihost_local.sh configs/digits.py:local /tmp/multihost [extra flags]
#   NUM_PROCESSES=4 DEVICES_PER_PROCESS=2 bash launch/multihost_local.sh configs/digits.py:local /tmp/mh4
#
# Process 0's output is shown as it runs; every process writes LOG_DIR/process_<i>.log.
# Waits for all of them; when one fails the others are stopped (they would wait for it
# forever) and the script fails with its exit status, showing the end of its log.
#
# Environment:
#   NUM_PROCESSES         processes (default 2)
#   DEVICES_PER_PROCESS   CPU devices each (XLA --xla_force_host_platform_device_count,
#                         default 1)
#   PORT                  the coordinator's port (default: a free one)
#   LOG_DIR               where the logs go (default: a new directory under /tmp)
#   XLA_FLAGS             passed on (the device count flag is added)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
n="${NUM_PROCESSES:-2}"
devices="${DEVICES_PER_PROCESS:-1}"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "multihost_local.sh: NUM_PROCESSES=$n: expected an int >= 1" >&2; exit 2; }
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "multihost_local.sh: DEVICES_PER_PROCESS=$devices: expected an int >= 1" >&2; exit 2; }

# shellcheck disable=SC1091
source "$root/launch/env.sh"  # The virtualenv (made once); cd to the repository root.
port="${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"
log_dir="${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/inhernet_multihost.XXXXXX")}"
mkdir -p "$log_dir"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"

pids=()
stop() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2> /dev/null || true
  done
}
trap 'stop; exit 130' INT TERM
trap 'stop; [ -z "${tail_pid:-}" ] || kill "$tail_pid" 2> /dev/null || true' EXIT

echo "multihost_local.sh: $n processes x $devices CPU device(s), coordinator localhost:$port," \
     "logs in $log_dir" >&2
for ((i = 0; i < n; i++)); do
  python -m launch.main --config="$config" --workdir="$workdir" \
    --coordinator_address="localhost:$port" --num_processes="$n" --process_id="$i" \
    "$@" > "$log_dir/process_$i.log" 2>&1 < /dev/null &
  pids+=("$!")
done
tail -n +1 -f --pid="${pids[0]}" "$log_dir/process_0.log" &
tail_pid=$!

# Poll rather than `wait -n`: which process ended matters, and bash keeps the exit
# status of a child it has reaped for a later `wait PID`.
status=0
failed=""
left="$n"
declare -A finished=()
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    [ -z "${finished[$i]:-}" ] || continue
    kill -0 "${pids[$i]}" 2> /dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[$i]=$rc
    left=$((left - 1))
    if ((rc != 0)) && [ -z "$failed" ]; then
      failed="$i"
      status="$rc"
      echo "multihost_local.sh: process $i failed (exit $rc); stopping the others" >&2
      stop
    fi
  done
  ((left == 0)) || sleep 0.5
done
wait "$tail_pid" 2> /dev/null || true
tail_pid=""

if [ -n "$failed" ]; then
  if [ "$failed" != 0 ]; then
    echo "--- the end of $log_dir/process_$failed.log ---" >&2
    tail -n 40 "$log_dir/process_$failed.log" >&2
  fi
  echo "multihost_local.sh: FAILED: process $failed exited with $status (logs in $log_dir)" >&2
  exit "$status"
fi
echo "multihost_local.sh: all $n processes finished (logs in $log_dir)" >&2
