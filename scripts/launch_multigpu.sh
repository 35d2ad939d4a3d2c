#!/usr/bin/env bash
# Run `specs-jax train` on GPUs: one node (one process sees all its GPUs) or several nodes with SLURM.
#
#   scripts/launch_multigpu.sh dpo configs/dpo_7b.yaml [key=value ...]              # this node
#   NODES=4 scripts/launch_multigpu.sh dpo configs/dpo_7b.yaml [key=value ...]      # inside an sbatch allocation
#
# With NODES > 1 it starts one process per node with srun; mesh.distributed=true makes each call
# jax.distributed.initialize(), which reads the coordinator and ranks from SLURM's environment.
# Outside SLURM, give every process the explicit settings instead: mesh.coordinator_address=HOST0:PORT
# mesh.num_processes=N mesh.process_id=I (see scripts/launch_local.sh for the same on one CPU machine).
# train.output_dir / checkpoint.dir must be on a file system shared by the nodes.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
KIND=$1; CONFIG=$2; shift 2
NODES=${NODES:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [ "$NODES" -eq 1 ]; then
  exec specs-jax train "$KIND" --config "$CONFIG" "$@"
fi
exec srun --nodes="$NODES" --ntasks-per-node=1 specs-jax train "$KIND" --config "$CONFIG" mesh.distributed=true "$@"
