#!/usr/bin/env bash
# N local processes of one multi-process training run on this machine's CPU (multi-host code
# paths without a cluster): jax.distributed over 127.0.0.1, gloo collectives.
#
#   launch/local_multiprocess.sh N CONFIG [--workdir=DIR] [--config.a.b=value ...]
#   MODULE=elmjax.evaluate launch/local_multiprocess.sh N CONFIG --workdir=RUN [--limit=...]
#
# Environment:
#   MODULE               the program each process runs (default elmjax.train; also
#                        elmjax.pretrain, elmjax.evaluate: every one takes --config)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1)
#   PORT                 coordinator port (default: a free one)
#   PYTHON               interpreter (default: .venv/bin/python when present, else python3)
#   LOG_DIR              process i > 0 writes to LOG_DIR/process-i.log (default: a temp dir);
#                        process 0 writes to this terminal
#   DRY_RUN=1            print the N commands and exit
#
# Exits with the first non-zero status of a process (and then kills the others); SIGINT and
# SIGTERM are passed on to every process (train.py saves a checkpoint on SIGTERM, exits 0).
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 N CONFIG [--workdir=DIR] [--config.a.b=value ...]" >&2
  exit 2
fi
N=$1
CONFIG=$2
shift 2
if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N must be a positive integer, got '$N'" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICES=${DEVICES_PER_PROCESS:-1}
if [[ -z ${PORT:-} ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -z ${LOG_DIR:-} ]]; then
  if [[ ${DRY_RUN:-0} == 1 ]]; then LOG_DIR='<temp dir>'; else LOG_DIR=$(mktemp -d -t elmjax-XXXXXX); fi
fi
XLA="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"

command_of() { # sets cmd to the command of process $1 (then the train.py arguments)
  local id=$1
  shift
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$XLA" "ELMJAX_COORDINATOR=127.0.0.1:$PORT"
    "ELMJAX_NUM_PROCESSES=$N" "ELMJAX_PROCESS_ID=$id" "$PYTHON" -m "${MODULE:-elmjax.train}"
    "--config=$CONFIG" "$@")
}

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    command_of "$i" "$@"
    printf '%q ' "${cmd[@]}"
    if ((i > 0)); then echo "> $LOG_DIR/process-$i.log 2>&1"; else echo; fi
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=() # the python processes themselves (env execs python), so signals reach them
for ((i = 0; i < N; i++)); do
  command_of "$i" "$@"
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$LOG_DIR/process-$i.log" 2>&1 &
  fi
  pids+=($!)
done
((N > 1)) && echo "processes 1..$((N - 1)) log to $LOG_DIR" >&2
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

# Wait for all; when one fails, kill the others (they would block in collectives).
status=0
remaining=$N
while ((remaining > 0)); do
  finished=
  set +e
  wait -n -p finished
  rc=$?
  set -e
  [[ -z ${finished:-} ]] && continue # a trapped signal interrupted the wait
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "a process exited with status $rc; stopping the others" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
