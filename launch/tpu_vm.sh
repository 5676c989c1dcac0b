#!/usr/bin/env bash
# Cloud TPU VM pod slices with gcloud: create, install simclr_jax on every worker, run a config,
# delete. Every worker runs the same `python -m simclr_jax.main`; jax.distributed.initialize()
# finds the coordinator, process count and id from the TPU metadata by itself. See docs/launch.md.
#
#   TPU_NAME=simclr ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu_vm.sh create
#   launch/tpu_vm.sh install
#   launch/tpu_vm.sh run configs/imagenet.py /mnt/simclr/runs/r50 --config.batch_size=4096
#   launch/tpu_vm.sh delete
set -euo pipefail

TPU_NAME="${TPU_NAME:-simclr-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"            # empty: gcloud's configured project
SPOT="${SPOT:-0}"                 # 1: a Spot (preemptible) slice
REMOTE_DIR="${REMOTE_DIR:-simclr_jax}"  # the code's folder in each worker's home directory
BUCKET="${BUCKET:-}"              # gs://bucket to mount at MOUNT_POINT (shared workdirs)
MOUNT_POINT="${MOUNT_POINT:-/mnt/simclr}"
JAX_PIP="${JAX_PIP:-jax[tpu]}"

usage() {
  cat <<EOF
usage: launch/tpu_vm.sh COMMAND [ARGS...]

commands:
  create                         create the TPU VM slice
  install                        copy this checkout to every worker, pip install it and
                                 ${JAX_PIP}; mount \$BUCKET at ${MOUNT_POINT} if set
  run CONFIG WORKDIR [FLAGS...]  run python -m simclr_jax.main on every worker (in the
                                 background; output in ~/simclr_run.log on each worker)
  logs [WORKER]                  follow ~/simclr_run.log of a worker (default 0)
  stop                           send SIGTERM to the run on every worker (it checkpoints)
  ssh [COMMAND...]               run a command on every worker (a shell on worker 0 if none)
  status                         describe the slice
  delete                         delete the slice

environment (current value):
  TPU_NAME=${TPU_NAME} ZONE=${ZONE} ACCELERATOR_TYPE=${ACCELERATOR_TYPE}
  RUNTIME_VERSION=${RUNTIME_VERSION} PROJECT=${PROJECT:-<gcloud default>} SPOT=${SPOT}
  REMOTE_DIR=${REMOTE_DIR} BUCKET=${BUCKET:-<none>} MOUNT_POINT=${MOUNT_POINT}

WORKDIR must be the same shared folder on every worker (a gcsfuse mount of \$BUCKET, or NFS):
orbax writes checkpoints from all workers and process 0 writes the logs and exports there.
EOF
}

gcloud_tpu() {
  local extra=()
  if [[ -n "$PROJECT" ]]; then extra+=(--project "$PROJECT"); fi
  gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${extra[@]}"
}

on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command "$1"
}

repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

cmd_create() {
  local extra=()
  if [[ "$SPOT" == "1" ]]; then extra+=(--spot); fi
  gcloud_tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$RUNTIME_VERSION" "${extra[@]}"
}

cmd_install() {
  local root archive
  root="$(repo_root)"
  archive="$(mktemp -d)/simclr_jax.tar.gz"
  # Only tracked files: no virtual environments, runs or caches from this machine.
  git -C "$root" archive --format=tar.gz -o "$archive" HEAD
  gcloud_tpu scp "$archive" "$TPU_NAME:~/simclr_jax.tar.gz" --worker=all
  on_all_workers "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; \
tar -xzf ~/simclr_jax.tar.gz -C ~/$REMOTE_DIR; \
python3 -m pip install -q --upgrade pip; \
python3 -m pip install -q '$JAX_PIP' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
python3 -m pip install -q -r ~/$REMOTE_DIR/requirements.txt; \
python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  if [[ -n "$BUCKET" ]]; then
    on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); \
echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; \
curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -; \
sudo apt-get update -q && sudo apt-get install -yq gcsfuse; fi; \
sudo mkdir -p $MOUNT_POINT && sudo chown \$USER $MOUNT_POINT; \
mountpoint -q $MOUNT_POINT || gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT_POINT"
  fi
}

cmd_run() {
  if [[ $# -lt 2 ]]; then
    echo "error: run needs CONFIG and WORKDIR" >&2
    usage >&2
    exit 2
  fi
  local config="$1" workdir="$2"
  shift 2
  local flags=""
  local f
  for f in "$@"; do flags+=" $(printf '%q' "$f")"; done
  # nohup: the run outlives the ssh session; jax.distributed auto-detects the TPU slice.
  on_all_workers "cd ~/$REMOTE_DIR && nohup python3 -m simclr_jax.main \
--config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir") \
--config.distributed.enabled=True$flags > ~/simclr_run.log 2>&1 & echo \$! > ~/simclr_run.pid"
  echo "started on every worker; follow with: launch/tpu_vm.sh logs 0" >&2
}

cmd_logs() {
  gcloud_tpu ssh "$TPU_NAME" --worker="${1:-0}" --command "tail -n 200 -f ~/simclr_run.log"
}

cmd_stop() {
  # SIGTERM on any worker reaches all through JAX's preemption sync: every worker saves a
  # checkpoint at the same step and exits; rerunning `run` with the same WORKDIR resumes.
  on_all_workers "test -f ~/simclr_run.pid && kill -TERM \$(cat ~/simclr_run.pid) || true"
}

cmd_ssh() {
  if [[ $# -eq 0 ]]; then
    gcloud_tpu ssh "$TPU_NAME" --worker=0
  else
    on_all_workers "$*"
  fi
}

main() {
  local cmd="${1:-}"
  if [[ $# -gt 0 ]]; then shift; fi
  case "$cmd" in
    create) cmd_create ;;
    install) cmd_install ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop ;;
    ssh) cmd_ssh "$@" ;;
    status) gcloud_tpu describe "$TPU_NAME" ;;
    delete) gcloud_tpu delete "$TPU_NAME" --quiet ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
