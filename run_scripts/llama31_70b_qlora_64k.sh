#!/bin/bash
# Llama-3.1-70B 5-task MFT with QLoRA at 64k context: 1 node x 8 GPUs, TP=4 x CP=2; ~37 GB per GPU
# (estimate in examples/llama31_70b_qlora_64k.yaml).
#SBATCH --job-name=l31-70b-qlora-64k
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Paths (override from the environment: DATA_DIR=... sbatch run_scripts/llama31_70b_qlora_64k.sh)
: "${DATA_DIR:=/data/mft/5tasks-llama3-seq65536}"
: "${CKPT:=/checkpoints/llama-3.1-70b-mcore}"  # from `convert hf-to-mcore`; HF_DIR=<hf folder> instead wins
: "${OUTPUT_DIR:=/outputs/llama31-70b-qlora-64k}"  # the same OUTPUT_DIR resumes

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

mft_launch examples/llama31_70b_qlora_64k.yaml
