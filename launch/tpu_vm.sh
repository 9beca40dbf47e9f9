#!/usr/bin/env bash
# Runs COMMAND on every worker of a Cloud TPU VM slice (gcloud ... ssh --worker=all), after
# creating the slice if asked and installing this project on all workers (idempotent: a worker
# that already holds the same copy skips the install).
#
# Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE [options] -- COMMAND [ARGS...]
#   --name=NAME         the TPU VM (slice) name
#   --zone=ZONE         its zone, e.g. us-east5-a
#   --project=PROJECT   Google Cloud project (default: gcloud's configured one)
#   --create=TYPE       create the slice with this accelerator type (e.g. v5p-128) unless a TPU VM
#                       of that name exists
#   --version=RUNTIME   TPU software version for --create (default: tpu-ubuntu2204-base)
#   --spot              create Spot VMs
#   --remote_dir=DIR    the project's directory on the workers (default: xattn_vlm, in $HOME)
#   --dry_run           print the gcloud commands instead of running them
#
# Example:
#   launch/tpu_vm.sh --name=flamingo --zone=us-east5-a --create=v5p-128 -- \
#       python -m xattn_vlm.train --multiprocess --config=experiments/flamingo_9b.py:mesh=tpu \
#       --workdir=gs://BUCKET/flamingo_9b
#
# The copy is this repository's tracked and untracked-but-not-ignored files (uncommitted edits
# included), installed with `pip install -e '.[tpu]'` into DIR/.venv. The workers share no disk, so
# a --workdir in COMMAND must be a gs:// path. Worker 0 prints to this terminal; the others write
# DIR/worker_<i>.log on their own disk.
set -euo pipefail

die() {
  echo "tpu_vm: $*" >&2
  exit 2
}

name=""
zone=""
project=""
create=""
version="tpu-ubuntu2204-base"
spot=0
remote_dir="xattn_vlm"
dry_run=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --create=*) create="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    *) die "unknown option '$1' (options come before '--'); see --help" ;;
  esac
  shift
done
[[ $# -gt 0 ]] && shift
[[ -n "$name" ]] || die "--name: expected the TPU VM name, got none"
[[ -n "$zone" ]] || die "--zone: expected a zone such as us-east5-a, got none"
[[ $# -gt 0 ]] || die "expected '-- COMMAND [ARGS...]' after the options, got no command"
for arg in "$@"; do
  if [[ "$arg" == --workdir=* && "$arg" != --workdir=gs://* ]]; then
    die "$arg: the workers of a TPU slice share no disk; expected --workdir=gs://BUCKET/..."
  fi
done

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")

quoted() {  # the words as one line a shell reads back as the same words ('...' where needed)
  local word words=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

run() {  # prints the command; runs it unless --dry_run
  echo "+ $(quoted "$@")"
  ((dry_run)) || "$@"
}

if [[ -n "$create" ]]; then
  if ((dry_run)) || ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
    ((dry_run)) && echo "# unless this finds it: $(quoted "${tpu[@]}" describe "$name" "${where[@]}")"
    flags=("--accelerator-type=$create" "--version=$version")
    ((spot)) && flags+=(--spot)
    run "${tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
  else
    echo "tpu_vm: $name exists; not creating it" >&2
  fi
fi

# The project as a tarball named by its content hash: workers already holding it skip the install.
root="$(cd "$(dirname "$0")/.." && pwd)"
package_dir="$(mktemp -d)"
trap 'rm -rf "$package_dir"' EXIT
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - --sort=name --mtime=@0 --owner=0 --group=0 -cf "$package_dir/project.tar")
hash="$(sha256sum "$package_dir/project.tar" | cut -c1-16)"
tarball="/tmp/xattn_vlm-$hash.tar"
run "${tpu[@]}" scp "$package_dir/project.tar" "$name:$tarball" "${where[@]}" --worker=all

install="set -e; cd; d=$(quoted "$remote_dir"); mkdir -p \$d; \
if [ \"\$(cat \$d/.installed 2>/dev/null)\" != $hash ]; then \
find \$d -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
tar -xf $tarball -C \$d; \
[ -x \$d/.venv/bin/python ] || python3 -m venv \$d/.venv; \
\$d/.venv/bin/pip install -q -e \"\$d[tpu]\"; \
echo $hash > \$d/.installed; fi"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install"

worker_id="curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0"
command="set -e; cd; cd $(quoted "$remote_dir"); . .venv/bin/activate; w=\$($worker_id); \
if [ \"\$w\" != 0 ]; then exec >worker_\$w.log 2>&1; fi; exec $(quoted "$@")"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$command"
