#!/usr/bin/env bash
# Runs one experiment on every worker of a Cloud TPU VM (a multi-host pod slice or a
# single host), from your own machine, with one gcloud command for all workers:
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/imagenet.py gs://bucket/run [extra flags]
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/imagenet.py gs://bucket/run \
#       --config.data.data_dir=gs://bucket/tfds --config.seeds=3
#
# On every worker at once (`gcloud compute tpus tpu-vm ssh $TPU_NAME --worker=all`):
#   1. the code: this checkout's files (tracked and untracked-but-not-ignored: what `git
#      status` shows, uncommitted edits included) are copied to $REMOTE_DIR and unpacked
#      over it; or, with REPO_URL set, $REMOTE_DIR is a clone of it at REPO_REF;
#   2. the environment: launch/env.sh makes the virtualenv from requirements.txt (once),
#      then jax[tpu] of the pinned jax version is installed on top (once per version);
#   3. the run: python -m launch.main --config=CONFIG --workdir=WORKDIR --distributed=on
#      [extra flags]. JAX finds the other workers from the TPU metadata: no coordinator
#      flags. Extra flags come last and win (e.g. --distributed=auto).
# Every worker must see the same WORKDIR and data: use gs:// paths (or a shared mount).
# Killed and started again with the same command, the run resumes from its checkpoints.
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM and its zone (required)
#   PROJECT          gcloud project (default: gcloud's configured one)
#   REMOTE_DIR       the code on the workers, relative to the ssh user's home or absolute
#                    (default inhernet_jax)
#   INHERNET_VENV    the virtualenv on the workers (default $REMOTE_DIR/.venv)
#   PYTHON           Python 3.11+ on the workers, to make the virtualenv (default python3;
#                    older TPU images ship Python 3.10: install e.g. python3.11 first)
#   REPO_URL         clone this repository instead of copying the checkout
#   REPO_REF         with REPO_URL: the commit/branch/tag to run (default: this
#                    checkout's HEAD commit, which must be pushed)
#   DETACH=1         start the run in the background (nohup) on every worker and return;
#                    output goes to $REMOTE_DIR/logs/<time>.log on each worker
#   DRY_RUN=1        print the gcloud commands (and the worker script) instead of running
set -euo pipefail

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 2 ] || usage
: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (the TPU VM zone)}"
CONFIG="$1"
WORKDIR="$2"
shift 2
EXTRA=("$@")

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-inhernet_jax}"
VENV="${INHERNET_VENV:-}"
PY="${PYTHON:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
DETACH="${DETACH:-0}"
TARBALL=""
config_file="${CONFIG%%:*}"
[ -f "$root/$config_file" ] || { echo "tpu_pod.sh: no config file $config_file in $root" >&2; exit 2; }

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && where+=(--project="$PROJECT")

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [ -n "$REPO_URL" ]; then
  if [ -z "$REPO_REF" ]; then
    REPO_REF="$(git -C "$root" rev-parse HEAD)"
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
      echo "tpu_pod.sh: warning: uncommitted changes are not in $REPO_REF (the workers clone" \
           "$REPO_URL); unset REPO_URL to copy this checkout as it is" >&2
    fi
  fi
else
  # The checkout as it is: tracked files and untracked files git does not ignore.
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  TARBALL="inhernet_code.$$.tar.gz"
  # shellcheck disable=SC2016
  (cd "$root" && git ls-files -z --cached --others --exclude-standard |
     xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh |
     tar --null -T - -czf "$tmp/$TARBALL")
  echo "Copying the code ($(du -h "$tmp/$TARBALL" | cut -f1)) to every worker of $TPU_NAME..." >&2
  run "${gcloud_tpu[@]}" scp "$tmp/$TARBALL" "$TPU_NAME:$TARBALL" --worker=all "${where[@]}"
fi

# The script every worker runs. Its settings are prepended as bash declarations and the
# whole is sent base64-encoded (and run with bash -c, not piped: nothing it starts can
# read the rest of it from stdin), so no value needs quoting for the remote shell.
read -r -d '' body <<'WORKER' || true
set -euo pipefail
cd "$HOME"
if [ -n "$REPO_URL" ]; then
  [ -d "$REMOTE_DIR/.git" ] || git clone -q "$REPO_URL" "$REMOTE_DIR"
  git -C "$REMOTE_DIR" fetch -q origin "$REPO_REF"
  git -C "$REMOTE_DIR" checkout -q --detach FETCH_HEAD
else
  mkdir -p "$REMOTE_DIR"
  tar -xzf "$HOME/$TARBALL" -C "$REMOTE_DIR"
  rm -f "$HOME/$TARBALL"
fi
cd "$REMOTE_DIR"
[ -z "$VENV" ] || export INHERNET_VENV="$VENV"
[ -z "$PY" ] || export PYTHON="$PY"
# shellcheck disable=SC1091
source launch/env.sh
# jax[tpu] of the pinned version on top (its libtpu), once per version and requirements.
jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)"
stamp="$(python -c 'import sys; print(sys.prefix)')/.jax-tpu"
want="$jax_version $(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "$(hostname): installing jax[tpu]==$jax_version..." >&2
  python -m pip install -q "jax[tpu]==$jax_version" \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  echo "$want" > "$stamp"
fi
cmd=(python -m launch.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=on "${EXTRA[@]}")
if [ "$DETACH" = 1 ]; then
  mkdir -p logs
  log="logs/$(date +%Y%m%d-%H%M%S).log"
  nohup "${cmd[@]}" > "$log" 2>&1 < /dev/null &
  echo "$(hostname): started (pid $!), log $PWD/$log"
else
  exec "${cmd[@]}"
fi
WORKER
script="$(declare -p CONFIG WORKDIR EXTRA REMOTE_DIR VENV PY REPO_URL REPO_REF TARBALL DETACH)
$body"
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "--- worker script ---" "$script" "---" >&2
fi
encoded="$(printf '%s\n' "$script" | base64 | tr -d '\n')"
echo "Running on every worker of $TPU_NAME: launch.main --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]}" >&2
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" \
  --command="bash -c \"\$(echo $encoded | base64 -d)\""
