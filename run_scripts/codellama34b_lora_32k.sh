#!/bin/bash
# CodeLlama-34B 5-task MFT with LoRA at 32k context: 1 node x 8 GPUs, TP=4 x CP=2;
# ~29 GB per GPU (estimate in examples/codellama34b_lora_32k.yaml).
#SBATCH --job-name=cl34b-lora-32k
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

# Paths (override from the environment: DATA_DIR=... sbatch run_scripts/codellama34b_lora_32k.sh)
: "${DATA_DIR:=/data/mft/5tasks-codellama-seq32768}"
: "${CKPT:=/checkpoints/codellama-34b-mcore}"  # from `convert hf-to-mcore`; HF_DIR=<hf folder> instead wins
: "${OUTPUT_DIR:=/outputs/codellama34b-lora-32k}"  # the same OUTPUT_DIR resumes

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

mft_launch examples/codellama34b_lora_32k.yaml
