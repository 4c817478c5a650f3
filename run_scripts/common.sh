# Shared launch logic for run_scripts/*.sh. Sourced, not run:
#
#   source "$ROOT/run_scripts/common.sh"
#   mft_launch examples/<recipe>.yaml [key=value ...]
#
# mft_launch starts one task per GPU with srun, each running
#   python -m megatron_mft.train --config <recipe> output_dir=$OUTPUT_DIR data.path=$DATA_DIR
#          train.init_checkpoint=$CKPT (or model.hf_init=$HF_DIR) [key=value ...] $EXTRA_ARGS
# Every task reads its rank from SLURM_PROCID/SLURM_LOCALID (megatron_mft.launch.env); the
# rendezvous is MASTER_ADDR:MASTER_PORT, exported here: the first host of the node list and a
# port derived from the job id (same formula as megatron_mft.launch.env.default_port).
#
# Variables (set them in the environment or with `sbatch --export=ALL,VAR=...`):
#   DATA_DIR      preprocessed data (tools/preprocess/preprocess_mft.py --output-dir)
#   OUTPUT_DIR    run directory: checkpoints, metrics.jsonl; reusing it resumes the run
#   CKPT          starting weights, a megatron checkpoint (convert hf-to-mcore --out)
#   HF_DIR        ... or a Hugging Face folder, converted at start-up (wins over CKPT)
#   EXTRA_ARGS    more key=value overrides, space separated (e.g. "train.steps=100")
#   PYTHON        interpreter on the compute nodes (default: python)
#   SRUN_ARGS     extra srun flags (e.g. "--cpu-bind=none")
#   CONTAINER_IMAGE, CONTAINER_MOUNTS   run inside a container (pyxis/enroot srun flags)
#   MASTER_ADDR, MASTER_PORT            override the derived rendezvous address
#   MAX_RESTARTS  stop requeueing after this many restarts (default 50)
#   DRY_RUN=1     print the resolved command and check that DATA_DIR and CKPT / HF_DIR exist
#                 (exit 1 naming each missing path, as the job would; else 0); starts nothing.
#                 Outside SLURM it fakes the job from the script's #SBATCH lines (node list
#                 node[01-NN], job id 12345); SLURM_JOB_NODELIST etc. can be set to try other layouts.
#
# One task per GPU rather than torchrun per node: SLURM's --signal=USR1 reaches srun tasks
# directly, while a torchrun agent would die on SIGUSR1 instead of passing it to the trainers.
#
# Stopping early and requeueing: on SIGUSR1 (sent by `#SBATCH --signal=USR1@300` before the
# time limit) or train.exit_duration_minutes the trainer saves a checkpoint and exits 0, and
# rank 0 writes the reason to $MFT_STOP_FILE; this script then runs `scontrol requeue`, and the
# requeued job resumes from OUTPUT_DIR. After SIGTERM (preemption, scancel) it does not
# requeue: SLURM requeues preempted jobs itself (--requeue), and scancel means stop.

set -euo pipefail

MFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${PYTHON:=$(command -v python || command -v python3 || echo python)}"
export PYTHONPATH="$MFT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Megatron's TP/SP communication overlap needs one CUDA work queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# Value of "#SBATCH --NAME=VALUE" (or "--NAME VALUE") in the running script, else DEFAULT.
mft_sbatch_opt() {
  local value
  value=$(sed -n -E "s/^#SBATCH[[:space:]]+--$1[=[:space:]]+([^[:space:]]+).*/\1/p" "$0" | tail -n 1)
  echo "${value:-$2}"
}

# Host names of a SLURM node list, one per line: scontrol where it works, else the Python
# expander (no scontrol in the container, or a client without a slurm.conf, as under DRY_RUN).
mft_hostnames() {
  command -v scontrol >/dev/null 2>&1 && scontrol show hostnames "$1" 2>/dev/null && return 0
  "$PYTHON" -m megatron_mft.launch.hostnames "$1"
}

# Outside SLURM under DRY_RUN: the variables sbatch would set, from the #SBATCH lines.
mft_fake_job() {
  local nodes
  nodes=$(mft_sbatch_opt nodes 1)
  : "${SLURM_JOB_ID:=12345}"
  : "${SLURM_JOB_NUM_NODES:=$nodes}"
  : "${SLURM_NTASKS_PER_NODE:=$(mft_sbatch_opt ntasks-per-node 1)}"
  if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
    if ((nodes == 1)); then SLURM_JOB_NODELIST=node01; else SLURM_JOB_NODELIST=$(printf 'node[01-%02d]' "$nodes"); fi
  fi
  export SLURM_JOB_ID SLURM_JOB_NUM_NODES SLURM_NTASKS_PER_NODE SLURM_JOB_NODELIST
}

mft_launch() {
  local recipe=$1
  shift
  [[ $recipe == /* ]] || recipe="$MFT_ROOT/$recipe"
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      mft_fake_job
    else
      echo "not inside a SLURM job: submit with sbatch, or set DRY_RUN=1 to see the command" >&2
      return 1
    fi
  fi

  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local per_node=${SLURM_NTASKS_PER_NODE:-$(mft_sbatch_opt ntasks-per-node 1)}
  local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
  local job_digits=${SLURM_JOB_ID//[^0-9]/}
  if [[ -z ${MASTER_ADDR:-} && -n $nodelist ]]; then
    MASTER_ADDR=$(mft_hostnames "$nodelist" | sed -n 1p)
  fi
  if [[ -z ${MASTER_ADDR:-} ]]; then
    echo "no master address: SLURM_JOB_NODELIST is empty and MASTER_ADDR is not set" >&2
    return 1
  fi
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((10000 + 10#${job_digits:-19500} % 20000))}

  local args=(--config "$recipe" "output_dir=$OUTPUT_DIR" "data.path=$DATA_DIR")
  local init=${HF_DIR:-${CKPT:-}}
  if [[ -n ${HF_DIR:-} ]]; then
    args+=("model.hf_init=$HF_DIR")
  elif [[ -n ${CKPT:-} ]]; then
    args+=("train.init_checkpoint=$CKPT")
  fi
  local extra=()
  read -r -a extra <<<"${EXTRA_ARGS:-}"
  args+=("$@" ${extra[@]+"${extra[@]}"})

  local srun_flags=(--nodes="$nodes" --ntasks-per-node="$per_node" --kill-on-bad-exit=1)
  if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    srun_flags+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$MFT_ROOT"
      --container-mounts="${CONTAINER_MOUNTS:-$MFT_ROOT}")
  fi
  local user_flags=()
  read -r -a user_flags <<<"${SRUN_ARGS:-}"
  local cmd=(srun "${srun_flags[@]}" ${user_flags[@]+"${user_flags[@]}"} "$PYTHON" -u -m megatron_mft.train "${args[@]}")

  echo "job ${SLURM_JOB_ID}: ${nodes} node(s) x ${per_node} task(s) = $((nodes * per_node)) ranks" \
    "on ${nodelist}; rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  echo "+ $(printf '%q ' "${cmd[@]}")"

  # fail here, before srun starts every task; a dry run checks the same (it is the check to run
  # before submitting) and fails alike
  local path missing=0
  for path in "$DATA_DIR" ${init:+"$init"}; do
    [[ -e $path ]] || { echo "not found: $path (DATA_DIR / CKPT / HF_DIR)" >&2; missing=1; }
  done
  ((missing == 0)) || return 1
  [[ ${DRY_RUN:-0} == 1 ]] && return 0
  if ! command -v "${cmd[0]}" >/dev/null 2>&1; then
    echo "${cmd[0]}: command not found on $(hostname 2>/dev/null || echo this machine); run the script as a SLURM batch job (sbatch)" >&2
    return 1
  fi
  mkdir -p "$OUTPUT_DIR"
  export MFT_STOP_FILE="$OUTPUT_DIR/.stop_reason.${SLURM_JOB_ID}"
  rm -f "$MFT_STOP_FILE"
  local rc=0
  "${cmd[@]}" || rc=$?
  local reason
  reason=$(cat "$MFT_STOP_FILE" 2>/dev/null || true)
  rm -f "$MFT_STOP_FILE"
  if [[ $rc == 0 && ($reason == SIGUSR1 || $reason == exit_duration) ]]; then
    if ((${SLURM_RESTART_COUNT:-0} < ${MAX_RESTARTS:-50})); then
      echo "stopped early ($reason) after saving a checkpoint: requeueing job ${SLURM_JOB_ID}"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "stopped early ($reason); not requeueing: SLURM_RESTART_COUNT reached MAX_RESTARTS" >&2
    fi
  fi
  return "$rc"
}
