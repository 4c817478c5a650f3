#!/bin/bash
# Tiny CodeLlama-architecture MFT on CPU (examples/tiny_cpu.yaml, the bundled demo data) at
# TP=2: two tasks, one core each, through the same run_scripts/common.sh launch as the GPU
# scripts. For trying the SLURM path on any SLURM, also a single-node one on a laptop
# (docs/operations.md, "Try it locally"); tests/slurm/ submits it to a real slurmctld.
#SBATCH --job-name=tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

# Paths (override from the environment: OUTPUT_DIR=... sbatch run_scripts/tiny_cpu.sh). The
# default data is the raw demo set, tokenised at start-up; DATA_DIR=<preprocessed folder> with
# EXTRA_ARGS="data.source=offline ..." reads a preprocess_mft.py output instead.
: "${DATA_DIR:=$MFT_ROOT/examples/demo_data/raw}"
: "${OUTPUT_DIR:=$MFT_ROOT/outputs/tiny_cpu_slurm}"  # the same OUTPUT_DIR resumes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

mft_launch examples/tiny_cpu.yaml \
  parallel.tp=2 \
  "data.tokenizer=$MFT_ROOT/examples/demo_data/tokenizer/demo_sp2048.model"
