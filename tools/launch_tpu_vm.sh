#!/usr/bin/env bash
# Run a cmat_jax recipe on a Cloud TPU VM slice: create / setup / run / logs / tail / ssh / delete.
#
#   TPU_NAME=cmat-7b ZONE=us-west4-a ACCELERATOR=v5litepod-8 tools/launch_tpu_vm.sh create
#   TPU_NAME=cmat-7b ZONE=us-west4-a HF_REPO=meta-llama/Llama-2-7b-chat-hf \
#       tools/launch_tpu_vm.sh setup
#   TPU_NAME=cmat-7b ZONE=us-west4-a tools/launch_tpu_vm.sh run train sft \
#       --preset llama2-7b-v5e-8 --data data/agent.jsonl --data data/general.jsonl
#   TPU_NAME=cmat-7b ZONE=us-west4-a tools/launch_tpu_vm.sh logs      # copy runs/ and logs/ back
#   TPU_NAME=cmat-7b ZONE=us-west4-a tools/launch_tpu_vm.sh delete
#
# Every worker of the slice runs the same command (`gcloud ... ssh --worker=all`); JAX's
# multi-controller runtime connects them (`python -m cmat_jax.distributed` calls
# `jax.distributed.initialize()`, which reads the slice topology from the TPU metadata).
# Process 0 writes the run directory and logs; every process writes its own log file.
#
# Settings (environment variables):
#   TPU_NAME      TPU VM name (required)
#   ZONE          zone (required), e.g. us-west4-a (v5e), us-east5-a (v5p), us-east5-b (v6e)
#   PROJECT       GCP project (default: gcloud's configured project)
#   ACCELERATOR   accelerator type for `create` (default v5litepod-8 = TPU v5e-8; v5p-8; v6e-8)
#   RUNTIME       TPU software version (default: picked from ACCELERATOR)
#   SPOT=1        create a spot (preemptible) TPU VM
#   REMOTE_DIR    checkout directory on the workers (default ~/cmat_jax)
#   HF_REPO       `setup`: HF model repo to download on every worker into ~/models/<repo name>
#   HF_TOKEN      `setup`: token for gated repos (Llama-2)
#   DATA          `setup`: space-separated local files/dirs copied to REMOTE_DIR/data/
set -euo pipefail

cmd=${1:-help}
shift || true

: "${REMOTE_DIR:=~/cmat_jax}"
: "${ACCELERATOR:=v5litepod-8}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)

need() {
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then
      echo "error: set $v (see the header of $0)" >&2
      exit 2
    fi
  done
}

runtime_for() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "error: no default RUNTIME for ACCELERATOR=$1; set RUNTIME" >&2; exit 2 ;;
  esac
}

gargs() {
  local a=(--zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && a+=(--project="$PROJECT")
  echo "${a[@]}"
}

on_all() {  # run a shell command on every worker
  # shellcheck disable=SC2046
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" $(gargs) --worker=all --command="$1"
}

case "$cmd" in
  create)
    need TPU_NAME ZONE
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm create "$TPU_NAME" $(gargs) \
      --accelerator-type="$ACCELERATOR" \
      --version="${RUNTIME:-$(runtime_for "$ACCELERATOR")}" "${extra[@]}"
    ;;

  setup)
    # Ship this checkout (tracked files at HEAD plus uncommitted changes) to every worker and
    # install it with JAX for TPU; optionally download the model and copy data files.
    need TPU_NAME ZONE
    tarball=$(mktemp /tmp/cmat_jax.XXXXXX.tar.gz)
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -czf "$tarball" -T -)
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":/tmp/cmat_jax.tar.gz $(gargs) --worker=all
    rm -f "$tarball"
    on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/cmat_jax.tar.gz -C $REMOTE_DIR \
      && cd $REMOTE_DIR && python3 -m pip install -q -U pip \
      && python3 -m pip install -q -e . 'jax[tpu]' huggingface_hub \
      && python3 -c 'import jax; print(jax.process_index(), jax.devices())'"
    if [[ -n "${HF_REPO:-}" ]]; then
      # config.json, *.safetensors and the tokenizer files into ~/models/<repo name>.
      on_all "HF_TOKEN=${HF_TOKEN:-} hf download $HF_REPO --local-dir ~/models/${HF_REPO##*/} \
        --include '*.json' '*.safetensors' 'tokenizer.model'"
    fi
    if [[ -n "${DATA:-}" ]]; then
      on_all "mkdir -p $REMOTE_DIR/data"
      for f in $DATA; do
        # shellcheck disable=SC2046
        gcloud compute tpus tpu-vm scp --recurse "$f" "$TPU_NAME":"$REMOTE_DIR/data/" $(gargs) --worker=all
      done
    fi
    ;;

  run)
    # Detached on every worker (survives a dropped ssh session); logs/<worker host>.log each.
    need TPU_NAME ZONE
    [[ $# -gt 0 ]] || { echo "error: run needs an entry point, e.g. 'run train sft --preset NAME ...'" >&2; exit 2; }
    args=$(printf ' %q' "$@")
    on_all "cd $REMOTE_DIR && mkdir -p logs && nohup python3 -m cmat_jax.distributed --mode tpu \
      $args > logs/\$(hostname).log 2>&1 < /dev/null & echo \$! > logs/\$(hostname).pid; \
      echo started on \$(hostname)"
    ;;

  tail)
    need TPU_NAME ZONE
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" $(gargs) --worker=0 \
      --command="tail -n ${LINES:-40} -f $REMOTE_DIR/logs/\$(hostname).log"
    ;;

  logs)
    # Process 0 (worker 0) holds the run directories; every worker has its own log file.
    need TPU_NAME ZONE
    mkdir -p tpu_logs
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME":"$REMOTE_DIR/runs" tpu_logs/ $(gargs) --worker=0 || true
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME":"$REMOTE_DIR/logs" tpu_logs/ $(gargs) --worker=all
    echo "copied to tpu_logs/"
    ;;

  ssh)
    need TPU_NAME ZONE
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" $(gargs) --worker="${WORKER:-0}" "$@"
    ;;

  stop)  # kill the training processes on every worker
    need TPU_NAME ZONE
    on_all "cd $REMOTE_DIR && kill \$(cat logs/\$(hostname).pid) || true"
    ;;

  delete)
    need TPU_NAME ZONE
    # shellcheck disable=SC2046
    gcloud compute tpus tpu-vm delete "$TPU_NAME" $(gargs) --quiet
    ;;

  help | *)
    sed -n '2,30p' "$0"
    ;;
esac
