#!/bin/bash
# Llama-3.1-70B 5-task MFT with QLoRA on one 80 GB GPU; ~67 GB (estimate in
# examples/llama31_70b_qlora.yaml). A step takes minutes here: USR1 30 min ahead leaves time to
# finish it and save.
#SBATCH --job-name=l31-70b-qlora-1gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@1800
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Paths (override from the environment: DATA_DIR=... sbatch run_scripts/llama31_70b_qlora_1gpu.sh)
: "${DATA_DIR:=/data/mft/5tasks-llama3-seq4096}"
: "${CKPT:=/checkpoints/llama-3.1-70b-mcore}"  # from `convert hf-to-mcore`; HF_DIR=<hf folder> instead wins
: "${OUTPUT_DIR:=/outputs/llama31-70b-qlora-1gpu}"  # the same OUTPUT_DIR resumes

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

mft_launch examples/llama31_70b_qlora.yaml \
  train.save_interval=4
