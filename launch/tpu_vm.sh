#!/bin/bash
# Trains with dit-jax on a Cloud TPU VM slice: creates the slice (or reuses it if it exists),
# installs this checkout on every worker, then runs `dit-jax train ARGS --coordinator=auto` on all
# workers at once (JAX finds the slice's workers itself).
#
#   launch/tpu_vm.sh --name=dit-v5p --zone=us-east5-a --accelerator=v5p-32 -- \
#       --config=dit:variant=XL/2,data=/mnt/shared/in256 --workdir=/mnt/shared/runs/xl2
#
# Options (before --): --name, --zone, --accelerator (required); --project (default: gcloud's);
# --version (TPU software; default by generation: v4, v5e, v5p, v6e); --spot (a Spot slice);
# --package=SPEC (pip-install SPEC, e.g. a git URL, instead of a wheel built from this checkout);
# --dry_run (print the commands, run nothing). Everything after -- goes to `dit-jax train`.
# The workdir must be a directory every worker sees at the same path (a bucket mounted with gcsfuse
# on each worker, or Filestore): the workers share no disk (README: "Several processes").
#
# If one worker dies, the others stop when JAX's heartbeat to it times out (about 100 s) and this
# script exits non-zero; running it again reuses the slice and resumes from the last checkpoint.
# Run it inside tmux/screen: closing the ssh sessions stops training.
set -euo pipefail

name="" zone="" accelerator="" project="" version="" spot="" package="" dry_run=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --package=*) package=${1#*=} ;;
    --spot) spot=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (dit-jax arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $name || -z $zone || -z $accelerator ]]; then
  echo "tpu_vm.sh: --name, --zone and --accelerator are required (see the top of $0)" >&2
  exit 2
fi
if [[ -z $version ]]; then
  case $accelerator in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "tpu_vm.sh: no default --version for $accelerator; pass one" >&2; exit 2 ;;
  esac
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
tpu="gcloud compute tpus tpu-vm"
where="--zone=$zone${project:+ --project=$project}"
venv="~/dit-jax-venv"

squote() {  # $1 in single quotes, for a --command that the workers' shell reads
  local q="'\\''"
  printf "'%s'" "${1//\'/$q}"
}

run() {  # prints the command; runs it unless --dry_run
  echo "$1"
  [[ -n $dry_run ]] || bash -c "$1"
}

run "$tpu describe $name $where --format='value(state)' >/dev/null 2>&1 || $tpu create $name $where \
--accelerator-type=$accelerator --version=$version${spot:+ --spot}"

if [[ -z $package ]]; then
  wheels=${TMPDIR:-/tmp}/dit-jax-tpu-vm-wheel
  run "rm -rf $wheels && python3 -m pip wheel --no-deps --quiet -w $wheels $repo && cp $repo/constraints.txt $wheels/"
  run "$tpu scp $wheels/* $name:~/ $where --worker=all"
  package="\$(ls ~/dit_jax-*.whl) -c ~/constraints.txt"
fi
install="python3 -m venv $venv && $venv/bin/pip install --quiet -U pip && $venv/bin/pip install --quiet 'jax[tpu]' $package"
run "$tpu ssh $name $where --worker=all --command=$(squote "$install")"

train="$venv/bin/dit-jax train$(printf ' %q' "$@") --coordinator=auto"
run "$tpu ssh $name $where --worker=all --command=$(squote "$train")"
