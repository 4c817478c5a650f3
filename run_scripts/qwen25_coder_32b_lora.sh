#!/bin/bash
# Qwen2.5-Coder-32B 5-task MFT with LoRA (bf16 base): 1 node x 8 GPUs, TP=4 x DP=2; ~37 GB per
# GPU (estimate in examples/qwen25_coder_32b_lora.yaml).
#SBATCH --job-name=qwen25c-32b-lora
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

# Paths (override from the environment: DATA_DIR=... sbatch run_scripts/qwen25_coder_32b_lora.sh)
: "${DATA_DIR:=/data/mft/5tasks-qwen2.5-coder-seq4096}"
: "${CKPT:=/checkpoints/qwen2.5-coder-32b-mcore}"  # from `convert hf-to-mcore`; HF_DIR=<hf folder> instead wins
: "${OUTPUT_DIR:=/outputs/qwen25-coder-32b-lora}"  # the same OUTPUT_DIR resumes

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

mft_launch examples/qwen25_coder_32b_lora.yaml
