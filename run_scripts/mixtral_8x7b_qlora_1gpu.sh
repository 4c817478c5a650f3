#!/bin/bash
# Mixtral-8x7B 5-task MFT with QLoRA (NF4 experts, per-expert adapters) on one GPU; ~39 GB
# (estimate in examples/mixtral_8x7b_qlora.yaml). A step takes minutes here: USR1 30 min ahead
# leaves time to finish it and save.
#SBATCH --job-name=mixtral-8x7b-qlora-1gpu
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

# Paths (override from the environment: DATA_DIR=... sbatch run_scripts/mixtral_8x7b_qlora_1gpu.sh)
: "${DATA_DIR:=/data/mft/5tasks-mixtral-seq4096}"
: "${CKPT:=/checkpoints/mixtral-8x7b-mcore}"  # from `convert hf-to-mcore`; HF_DIR=<hf folder> instead wins
: "${OUTPUT_DIR:=/outputs/mixtral-8x7b-qlora-1gpu}"  # the same OUTPUT_DIR resumes

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

mft_launch examples/mixtral_8x7b_qlora.yaml \
  train.save_interval=4
