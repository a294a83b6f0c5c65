#!/usr/bin/env bash
#SBATCH --job-name=inhernet
#SBATCH --ntasks-per-node=1
# Runs one experiment over several GPU nodes: one process per node, all of its GPUs.
#
# With SLURM (the batch script sets up the environment once, then starts one task per
# node with srun; every task reads coordinator, process count and id from SLURM):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_cluster.sh configs/cifar100.py /shared/workdir [extra flags]
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu_cluster.sh configs/cifar100.py /shared/workdir
# By hand, on each node (the same command, PROCESS_ID = 0 .. NUM_PROCESSES-1; process 0
# runs on the COORDINATOR host):
#   COORDINATOR=node0:12355 NUM_PROCESSES=2 PROCESS_ID=0 bash launch/gpu_cluster.sh configs/cifar100.py /shared/workdir [extra flags]
# Without SLURM or COORDINATOR it runs one process on this machine.
#
# Each process: sources launch/env.sh (the virtualenv of requirements.txt, made once),
# installs jax[cuda12] of the pinned jax version on top when this node has an NVIDIA GPU
# (once per version), then runs
#   python -m launch.main --config=CONFIG --workdir=WORKDIR --coordinator_address=HOST:PORT \
#       --num_processes=N --process_id=I [extra flags]
# The workdir (and the data) must be on a filesystem every node sees. Killed and started
# again with the same command, the run resumes from its checkpoints.
#
# Environment:
#   COORDINATOR      host:port of process 0 (SLURM: the job's first node, port $PORT)
#   NUM_PROCESSES, PROCESS_ID   (SLURM: SLURM_NTASKS, SLURM_PROCID)
#   PORT             the coordinator's port under SLURM (default 12355)
#   INHERNET_ROOT    the repository (default: the one holding this script; under sbatch,
#                    which runs a copy of the script, $SLURM_SUBMIT_DIR: submit from it)
#   INHERNET_VENV    the virtualenv (default $INHERNET_ROOT/.venv); PYTHON makes it (3.11+)
#   INHERNET_CUDA    auto (default: if nvidia-smi sees a GPU) / 1 / 0: install jax[cuda12]
#   SRUN_ARGS        extra srun options for the tasks the batch script starts
set -euo pipefail

die() {
  echo "gpu_cluster.sh: $*" >&2
  exit 2
}
is_root() { [ -f "$1/launch/main.py" ] && [ -f "$1/launch/env.sh" ]; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${INHERNET_ROOT:-}" ]; then
  root="$INHERNET_ROOT"
elif is_root "$here"; then
  root="$here"
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && is_root "$SLURM_SUBMIT_DIR"; then
  root="$SLURM_SUBMIT_DIR"  # sbatch runs a copy of this script from its spool directory.
else
  die "cannot find the repository: submit from its root or set INHERNET_ROOT"
fi
is_root "$root" || die "INHERNET_ROOT=$root is not the repository (no launch/main.py)"
[ $# -ge 2 ] || die "usage: [sbatch ...] launch/gpu_cluster.sh CONFIG WORKDIR [extra flags]"
config="$1"
workdir="$2"
shift 2
[ -f "$root/${config%%:*}" ] || die "no config file ${config%%:*} in $root"

# The virtualenv, with jax[cuda12] on top where there is a GPU. Under a lock, so that
# processes on nodes sharing the filesystem do not install into it at the same time.
setup() {
  local venv="${INHERNET_VENV:-$root/.venv}"
  mkdir -p "$venv"
  if command -v flock > /dev/null; then
    exec 9> "$venv/.setup.lock"
    flock 9
  fi
  # shellcheck disable=SC1091
  source "$root/launch/env.sh"
  local cuda="${INHERNET_CUDA:-auto}"
  if [ "$cuda" = auto ]; then
    cuda=0
    if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
      cuda=1
    fi
  fi
  if [ "$cuda" = 1 ]; then
    local version stamp want
    version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$root/requirements.txt")"
    stamp="$venv/.jax-cuda12"
    want="$version $(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2> /dev/null)" != "$want" ]; then
      echo "$(hostname): installing jax[cuda12]==$version..." >&2
      python -m pip install -q "jax[cuda12]==$version"
      echo "$want" > "$stamp"
    fi
  fi
  if command -v flock > /dev/null; then
    flock -u 9
    exec 9>&-
  fi
}

slurm_coordinator() {
  local host
  host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  [ -n "$host" ] || die "no hosts in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
  echo "$host:${PORT:-12355}"
}

# Which of: by hand (COORDINATOR, ...), the SLURM batch script (or an salloc shell: no job
# step yet; step ids 4294967291/4294967290 are the batch/extern steps), a SLURM task, alone.
manual="${COORDINATOR:-}${NUM_PROCESSES:-}${PROCESS_ID:-}"
batch=0
if [ -z "$manual" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${INHERNET_IN_STEP:-}" ]; then
  case "${SLURM_STEP_ID:-}" in "" | 4294967291 | 4294967290) batch=1 ;; esac
fi
if [ "$batch" = 1 ]; then
  # Set up once here, then start one task per node (each runs this script again).
  command -v srun > /dev/null || die "SLURM_JOB_ID is set but there is no srun"
  setup
  INHERNET_COORDINATOR="$(slurm_coordinator)"
  export INHERNET_COORDINATOR INHERNET_IN_STEP=1 INHERNET_ROOT="$root"
  echo "gpu_cluster.sh: ${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NODELIST:-?}," \
       "coordinator $INHERNET_COORDINATOR" >&2
  # shellcheck disable=SC2086  # SRUN_ARGS: several options, split on spaces.
  exec srun --kill-on-bad-exit=1 --label ${SRUN_ARGS:-} bash "$root/launch/gpu_cluster.sh" \
    "$config" "$workdir" "$@"
fi

flags=()
if [ -n "$manual" ]; then
  if [ -z "${COORDINATOR:-}" ] || [ -z "${NUM_PROCESSES:-}" ] || [ -z "${PROCESS_ID:-}" ]; then
    die "set all of COORDINATOR (host:port), NUM_PROCESSES and PROCESS_ID, or none"
  fi
  flags=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES"
         --process_id="$PROCESS_ID")
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_PROCID:-}" ] && [ -n "${SLURM_NTASKS:-}" ]; then
  coordinator="${INHERNET_COORDINATOR:-$(slurm_coordinator)}"
  flags=(--coordinator_address="$coordinator" --num_processes="$SLURM_NTASKS"
         --process_id="$SLURM_PROCID")
else
  echo "gpu_cluster.sh: no SLURM job and no COORDINATOR: one process on $(hostname)" >&2
fi
setup
echo "gpu_cluster.sh: $(hostname): launch.main ${flags[*]}" >&2
exec python -m launch.main --config="$config" --workdir="$workdir" "${flags[@]}" "$@"
