#!/bin/bash
# Qwen3-Coder-30B-A3B 5-task MFT with LoRA (bf16 base, per-expert adapters): 1 node x 8 GPUs,
# EP=8 x DP=8 (16 experts per GPU); ~26 GB per GPU (estimate in examples/qwen3_coder_30b_a3b_lora.yaml).
#SBATCH --job-name=qwen3c-30b-a3b-lora
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

# Paths (override from the environment: DATA_DIR=... sbatch run_scripts/qwen3_coder_30b_a3b_lora.sh)
: "${DATA_DIR:=/data/mft/5tasks-qwen3-coder-seq4096}"
: "${CKPT:=/checkpoints/qwen3-coder-30b-a3b-mcore}"  # from `convert hf-to-mcore`; HF_DIR=<hf folder> instead wins
: "${OUTPUT_DIR:=/outputs/qwen3-coder-30b-a3b-lora}"  # the same OUTPUT_DIR resumes

for ROOT in "${REPO_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f $ROOT/run_scripts/common.sh ]] && break
done  # sbatch runs a copy of this file: find the repository (or set REPO_ROOT)
source "$ROOT/run_scripts/common.sh" || { echo "run_scripts/common.sh not found: set REPO_ROOT" >&2; exit 1; }

mft_launch examples/qwen3_coder_30b_a3b_lora.yaml
