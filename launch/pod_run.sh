#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice (each worker runs the same
# program; jax.distributed discovers the others). Usage:
#   launch/pod_run.sh TPU_NAME ZONE [PROJECT] -- python launch/tpu_train.py --config configs/llama65b.py --workdir gs://...
# It syncs this checkout to ~/lima_jax on all workers, installs it, then runs the command there.
set -euo pipefail
usage() { echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2; exit 2; }
[[ $# -ge 2 ]] || usage
name=$1 zone=$2; shift 2
project_flag=()
if [[ $# -gt 0 && $1 != "--" ]]; then project_flag=(--project "$1"); shift; fi
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || usage
# ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4 (macOS's 3.2)
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" ${project_flag[@]+"${project_flag[@]}"} --worker=all --command "$1"; }
here=$(cd "$(dirname "$0")/.." && pwd)
tgz=$(mktemp "${TMPDIR:-/tmp}/lima_jax.XXXXXX")  # its own file: launches side by side do not clobber each other
trap 'rm -f "$tgz"' EXIT
tar -C "$here" --exclude=.git --exclude='workdir*' -czf "$tgz" .
gcloud compute tpus tpu-vm scp "$tgz" "$name":lima_jax.tgz --zone "$zone" ${project_flag[@]+"${project_flag[@]}"} --worker=all
ssh_all "mkdir -p ~/lima_jax && tar -C ~/lima_jax -xzf ~/lima_jax.tgz && rm ~/lima_jax.tgz && cd ~/lima_jax && pip install -q -e '.[tpu]'"
ssh_all "cd ~/lima_jax && $(printf '%q ' "$@")"
