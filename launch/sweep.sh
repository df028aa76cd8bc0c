#!/usr/bin/env bash
# A grid of config overrides, one training run after another, each in its own run directory.
#
#   launch/sweep.sh CONFIG "a.b=1,2" "c=x,y" ... [-- extra train.py arguments]
#
# runs every combination (here 4) as
#   $TRAIN --config=CONFIG --workdir=$RUNS/<name>/a.b=1_c=x --config.a.b=1 --config.c=x [extra]
# <name> is the config file's name plus its argument (configs/ecgbyte_1024.py:demo ->
# ecgbyte_1024_demo); characters other than [A-Za-z0-9._=+-] in a tag become '-'. Values are
# split on commas (a value cannot contain one). A rerun skips nothing itself: train.py resumes
# finished or interrupted runs from their checkpoints (a finished run returns at once).
#
# Environment:
#   TRAIN     the training command (default: "$PYTHON -m elmjax.train"; for example
#             "launch/local_multiprocess.sh 2")
#   PYTHON    interpreter (default: .venv/bin/python when present, else python3)
#   RUNS      parent of the run directories (default: runs)
#   PREPARED  a run directory whose shards/, segments/ and tokenizers/ every point links to
#             (for sweeps over training settings only; train.py checks the data settings)
#   DRY_RUN=1 print the commands only
# Exit status: 0 when every run succeeded, else 1 (failed runs are listed; the sweep goes on).
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 CONFIG \"a.b=1,2\" [\"c=x,y\" ...] [-- extra arguments]" >&2
  exit 2
fi
CONFIG=$1
shift
axes=()
while (($#)) && [[ $1 != -- ]]; do
  if ! [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_.]*=.+ ]]; then
    echo "error: '$1' is not key=v1,v2,..." >&2
    exit 2
  fi
  axes+=("$1")
  shift
done
(($#)) && shift # the --
extra=("$@")

cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a train <<<"${TRAIN:-$PYTHON -m elmjax.train}"
RUNS=${RUNS:-runs}
name=$(basename "${CONFIG%%:*}" .py)
[[ $CONFIG == *:* ]] && name="${name}_${CONFIG#*:}"
name=${name//[^A-Za-z0-9._=+-]/-}

# The grid: each point is a list of key=value overrides separated by newlines.
points=("")
for axis in "${axes[@]}"; do
  key=${axis%%=*}
  IFS=, read -r -a values <<<"${axis#*=}"
  next=()
  for point in "${points[@]}"; do
    for value in "${values[@]}"; do
      next+=("${point:+$point$'\n'}$key=$value")
    done
  done
  points=("${next[@]}")
done

failed=()
for point in "${points[@]}"; do
  mapfile -t overrides <<<"$point"
  tag=$(IFS=_; echo "${overrides[*]}")
  tag=${tag//[^A-Za-z0-9._=+-]/-}
  workdir="$RUNS/$name/$tag"
  cmd=("${train[@]}" "--config=$CONFIG" "--workdir=$workdir")
  for o in "${overrides[@]}"; do cmd+=("--config.$o"); done
  cmd+=("${extra[@]}")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "${cmd[*]}"
    continue
  fi
  if [[ -n ${PREPARED:-} ]]; then
    mkdir -p "$workdir"
    for part in shards segments tokenizers; do
      [[ -e $workdir/$part ]] || ln -s "$(realpath "$PREPARED/$part")" "$workdir/$part"
    done
  fi
  echo "=== $tag" >&2
  "${cmd[@]}" || failed+=("$tag")
done
if ((${#failed[@]})); then
  echo "failed runs: ${failed[*]}" >&2
  exit 1
fi
