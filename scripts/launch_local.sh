#!/usr/bin/env bash
# Start N local CPU processes that form one multi-process job (development and tests of multi-host code):
#
#   scripts/launch_local.sh N specs-jax train grpo --config configs/grpo_tiny.yaml [key=value ...]
#
# Each process gets DEVICES CPU devices (default 4; XLA_FLAGS) and the explicit process settings
# mesh.coordinator_address=127.0.0.1:PORT mesh.num_processes=N mesh.process_id=I (PORT default 12345), so the
# N processes form one N x DEVICES device job with gloo collectives, exactly as N hosts of a pod would.
# Process I writes its output to LOGDIR/process_I.log (default runs/launch_local); process 0's is also shown.
# If any process fails, the others are stopped and the script exits with that process's status.
# PJRT_NPROC (default 4 x DEVICES) sizes XLA:CPU's thread pool: a collective blocks a pool thread until every
# local device joins it, so a pool no larger than the device count can deadlock on two independent collectives.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
N=$1; shift
DEVICES=${DEVICES:-4}; PORT=${PORT:-12345}; LOGDIR=${LOGDIR:-runs/launch_local}
mkdir -p "$LOGDIR"
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu PJRT_NPROC=${PJRT_NPROC:-$((4 * DEVICES))} \
    "$@" mesh.coordinator_address="127.0.0.1:$PORT" mesh.num_processes="$N" mesh.process_id="$i" \
    > "$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$LOGDIR/process_0.log" & tailer=$!
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; rc=$?
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    kill "${pids[@]}" 2>/dev/null
  fi
done
kill "$tailer" 2>/dev/null
exit "$status"
