#!/usr/bin/env bash
# Training on every worker of a Cloud TPU VM pod slice (one process per host, started at once).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--workdir=DIR] [--config.a.b=value ...]
#
# Before: the repository and its .venv at $REMOTE_DIR on every worker (see launch/README.md),
# the run directory on storage every worker sees (NFS/Filestore or a gcsfuse mount), and its
# shards prepared once (python -m elmjax.prepare --config=CONFIG --config.workdir=DIR).
# ELMJAX_DISTRIBUTED=1 makes train.py call jax.distributed.initialize(), which finds the
# workers in the TPU VM metadata. The processes stop when this ssh session ends: run it inside
# tmux/screen, or set DETACH=1 (each worker then logs to ~/elmjax-train.log).
#
# Environment: REMOTE_DIR (default ~/elmjax), PROJECT (gcloud --project), DETACH=1,
#              DRY_RUN=1 (print the gcloud command only).
set -euo pipefail

if (($# < 3)); then
  echo "usage: $0 TPU_NAME ZONE CONFIG [--workdir=DIR] [--config.a.b=value ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
shift 3
REMOTE_DIR=${REMOTE_DIR:-'~/elmjax'} # expanded on the workers

remote="ELMJAX_DISTRIBUTED=1 .venv/bin/python -m elmjax.train $(printf '%q ' "--config=$CONFIG" "$@")"
if [[ ${DETACH:-0} == 1 ]]; then
  remote="nohup env $remote > ~/elmjax-train.log 2>&1 < /dev/null &"
fi
remote="cd $REMOTE_DIR && $remote"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"}
  --worker=all --command "$remote")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
