#!/usr/bin/env bash
# Run `specs-jax train` on every worker of a Cloud TPU pod slice (one process per host).
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE dpo configs/dpo_7b.yaml [key=value ...]
#
# Every worker runs the same command; mesh.distributed=true makes each call
# jax.distributed.initialize(), which discovers the other hosts on TPU. The repository must be
# checked out at the same path on every worker (REPO, default: ~/specs-jax) with `pip install -e .`
# done, and train.output_dir / checkpoint.dir should be a gs:// or shared path.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; KIND=$3; CONFIG=$4; shift 4
REPO=${REPO:-'~/specs-jax'}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && specs-jax train $KIND --config $CONFIG mesh.distributed=true $*"
