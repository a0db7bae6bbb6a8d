#!/usr/bin/env bash
# Run a cmat_jax recipe on a Cloud TPU VM slice: create / setup / run / logs / tail / ssh / stop / delete.
#
#   TPU_NAME=cmat-7b ZONE=us-west4-a ACCELERATOR=v5litepod-8 tools/launch_tpu_vm.sh create
#   TPU_NAME=cmat-7b ZONE=us-west4-a HF_REPO=meta-llama/Llama-2-7b-chat-hf \
#       tools/launch_tpu_vm.sh setup
#   TPU_NAME=cmat-7b ZONE=us-west4-a tools/launch_tpu_vm.sh run train sft \
#       --preset llama2-7b-v5e-8 --data data/agent.jsonl --data data/general.jsonl \
#       --out gs://my-bucket/runs/llama2-sft
#   TPU_NAME=cmat-7b ZONE=us-west4-a tools/launch_tpu_vm.sh logs      # copy runs/ and logs/ back
#   TPU_NAME=cmat-7b ZONE=us-west4-a tools/launch_tpu_vm.sh delete
#
#   tools/launch_tpu_vm.sh --dry-run setup      # print the exact commands, run nothing
#
# `setup` brings its own Python on every worker (the TPU VM images ship 3.10; cmat_jax needs
# >= 3.11): it installs `uv` from PyPI, `uv python install $PYTHON_VERSION`, makes
# $REMOTE_DIR/.venv and installs this checkout with `jax[tpu]` at the version pinned in
# pyproject.toml (the `tpu` extra).
# Every worker runs the same command (`gcloud ... ssh --worker=all`); JAX's multi-controller
# runtime connects them (`python -m cmat_jax.distributed --mode tpu` calls
# `jax.distributed.initialize()`, which reads the slice topology from the TPU metadata).
# Process 0 writes the run directory and logs; every process writes its own log file.
# gs:// paths in `run` arguments (run directory `--out`, data files) are mounted with gcsfuse
# on every worker under $REMOTE_DIR/gcs/<bucket> and passed as those paths, so all workers of a
# multi-host slice share one run and checkpoint directory.
#
# Settings (environment variables):
#   TPU_NAME        TPU VM name (required)
#   ZONE            zone (required), e.g. us-west4-a (v5e), us-east5-a (v5p), us-east5-b (v6e)
#   PROJECT         GCP project (default: gcloud's configured project)
#   ACCELERATOR     accelerator type for `create` (default v5litepod-8 = TPU v5e-8; v5p-8; v6e-8)
#   RUNTIME         TPU software version (default: picked from ACCELERATOR)
#   SPOT=1          create a spot (preemptible) TPU VM
#   REMOTE_DIR      checkout directory on the workers (default ~/cmat_jax)
#   PYTHON_VERSION  Python that `setup` installs with uv (default 3.11)
#   HF_REPO         `setup`: HF model repo to download on every worker into ~/models/<repo name>
#   HF_TOKEN        `setup`: token for gated repos (Llama-2)
#   DATA            `setup`: space-separated local files/dirs copied to REMOTE_DIR/data/
#   DRY_RUN=1       same as --dry-run
set -euo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
DRY_RUN=${DRY_RUN:-0}
cmd=${1:-help}
shift || true

REMOTE_DIR=${REMOTE_DIR:-'~/cmat_jax'}  # expanded by the workers' shell, not here
: "${ACCELERATOR:=v5litepod-8}"
: "${PYTHON_VERSION:=3.11}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# The jax[tpu] pin of the `tpu` extra in pyproject.toml (one place for the version).
JAX_TPU=$(sed -n 's/^tpu = \["\(jax\[tpu\]==[^"]*\)"\]$/\1/p' "$ROOT/pyproject.toml")
if [[ -z "$JAX_TPU" ]]; then
  echo "error: $ROOT/pyproject.toml: no 'tpu = [\"jax[tpu]==VERSION\"]' extra" >&2
  exit 2
fi

need() {
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then
      echo "error: set $v (see the header of $0)" >&2
      exit 2
    fi
  done
}

x() {  # run a command, or print it (shell-quoted, one line) under --dry-run
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
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

gargs=()
set_gargs() {
  gargs=(--zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && gargs+=(--project="$PROJECT")
  return 0
}

on_all() {  # run a shell command on every worker
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gargs[@]}" --worker=all --command="$1"
}

# Worker-side shell snippets.
UV="\$HOME/.local/bin/uv"
# gcsfuse from Google's apt repository (Cloud Storage FUSE install guide), once per worker.
INSTALL_GCSFUSE="command -v gcsfuse >/dev/null || { \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
&& curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
&& sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"

case "$cmd" in
  create)
    need TPU_NAME ZONE
    set_gargs
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${gargs[@]}" \
      --accelerator-type="$ACCELERATOR" \
      --version="${RUNTIME:-$(runtime_for "$ACCELERATOR")}" "${extra[@]}"
    ;;

  setup)
    # Ship this checkout (tracked files at HEAD plus uncommitted changes) to every worker,
    # bring Python $PYTHON_VERSION with uv and install the package with JAX for TPU;
    # optionally download the model and copy data files.
    need TPU_NAME ZONE
    set_gargs
    tarball=/tmp/cmat_jax.$$.tar.gz
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "(cd $(printf '%q' "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $tarball -T -)"
    else
      (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -czf "$tarball" -T -)
    fi
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":/tmp/cmat_jax.tar.gz "${gargs[@]}" --worker=all
    x rm -f "$tarball"
    on_all "set -e; mkdir -p $REMOTE_DIR && tar -xzf /tmp/cmat_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR \
&& python3 -m pip install -q --user -U uv \
&& $UV python install $PYTHON_VERSION \
&& $UV venv --allow-existing --python $PYTHON_VERSION .venv \
&& $UV pip install -q --python .venv/bin/python -e . '$JAX_TPU' huggingface_hub \
&& .venv/bin/python -c 'import sys, jax; print(sys.version.split()[0], jax.__version__, jax.process_index(), jax.devices())'"
    if [[ -n "${HF_REPO:-}" ]]; then
      # config.json, *.safetensors and the tokenizer files into ~/models/<repo name>.
      token=${HF_TOKEN:-}
      [[ "$DRY_RUN" == 1 && -n "$token" ]] && token='<HF_TOKEN>'  # never print the secret
      on_all "HF_TOKEN=$token $REMOTE_DIR/.venv/bin/hf download $HF_REPO \
--local-dir ~/models/${HF_REPO##*/} --include '*.json' '*.safetensors' 'tokenizer.model'"
    fi
    if [[ -n "${DATA:-}" ]]; then
      on_all "mkdir -p $REMOTE_DIR/data"
      for f in $DATA; do
        x gcloud compute tpus tpu-vm scp --recurse "$f" "$TPU_NAME":"$REMOTE_DIR/data/" "${gargs[@]}" --worker=all
      done
    fi
    ;;

  run)
    # Detached on every worker (survives a dropped ssh session); logs/<worker host>.log each.
    need TPU_NAME ZONE
    set_gargs
    [[ $# -gt 0 ]] || { echo "error: run needs an entry point, e.g. 'run train sft --preset NAME ...'" >&2; exit 2; }
    # gs://BUCKET/PATH arguments -> gcs/BUCKET/PATH under REMOTE_DIR, each bucket mounted once.
    args=()
    buckets=()
    for a in "$@"; do
      if [[ "$a" =~ ^(--[A-Za-z0-9_.-]+=)?gs://([^/]+)(/.*)?$ ]]; then
        flag=${BASH_REMATCH[1]} bucket=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
        [[ " ${buckets[*]} " == *" $bucket "* ]] || buckets+=("$bucket")
        a="${flag}gcs/$bucket$rest"
      fi
      args+=("$a")
    done
    mounts=""
    if [[ ${#buckets[@]} -gt 0 ]]; then
      mounts="$INSTALL_GCSFUSE && "
      for b in "${buckets[@]}"; do
        mounts+="mkdir -p gcs/$b && { mountpoint -q gcs/$b || gcsfuse --implicit-dirs $b gcs/$b; } && "
      done
    fi
    quoted=$(printf ' %q' "${args[@]}")
    on_all "cd $REMOTE_DIR && mkdir -p logs && ${mounts}nohup .venv/bin/python -m cmat_jax.distributed --mode tpu \
$quoted > logs/\$(hostname).log 2>&1 < /dev/null & echo \$! > logs/\$(hostname).pid; \
echo started on \$(hostname)"
    ;;

  tail)
    need TPU_NAME ZONE
    set_gargs
    x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gargs[@]}" --worker=0 \
      --command="tail -n ${LINES:-40} -f $REMOTE_DIR/logs/\$(hostname).log"
    ;;

  logs)
    # Process 0 (worker 0) holds the local run directories; every worker has its own log file.
    need TPU_NAME ZONE
    set_gargs
    x mkdir -p tpu_logs
    x gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME":"$REMOTE_DIR/runs" tpu_logs/ "${gargs[@]}" --worker=0 || true
    x gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME":"$REMOTE_DIR/logs" tpu_logs/ "${gargs[@]}" --worker=all
    echo "copied to tpu_logs/"
    ;;

  ssh)
    need TPU_NAME ZONE
    set_gargs
    x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gargs[@]}" --worker="${WORKER:-0}" "$@"
    ;;

  stop)  # kill the training processes on every worker
    need TPU_NAME ZONE
    set_gargs
    on_all "cd $REMOTE_DIR && kill \$(cat logs/\$(hostname).pid) || true"
    ;;

  delete)
    need TPU_NAME ZONE
    set_gargs
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gargs[@]}" --quiet
    ;;

  help | *)
    sed -n '2,43p' "$0"
    ;;
esac
