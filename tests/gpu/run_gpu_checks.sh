#!/usr/bin/env bash
# The GPU checks the issues name, as one prepared script for the device tool (one H100/H200,
# Python 3.12, PyTorch 2.11, peft + transformers, no megatron-core/TE/flash-attn, no internet).
#
# Before the call, here (not on the device), fetch the megatron-core wheel for Python 3.12:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# Then: device run with carry=[".whl"], command "bash tests/gpu/run_gpu_checks.sh", timeout_s 540.
# Results land in $OUT (JSON per check + log); copy the figures, with the card, to docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
B=tools/bench/train_throughput.py
run() { local name=$1; shift; echo "== $name"; timeout 150 python3 "$B" "$@" --json "$OUT/$name.json" 2>&1 | tail -25; }
# issue 2: CodeLlama-34B-shaped layers, bf16, seq 4096, plain PyTorch SDPA (no TE here)
run full34b_4l --preset codellama-34b --layers 4 --seq 4096 --micro-batch 1 --micro-batches 2 --steps 3 --precision bf16
# issue 5: LoRA vs QLoRA step time and peak memory on the same layers
run lora34b_4l --preset codellama-34b --layers 4 --seq 4096 --micro-batch 1 --micro-batches 2 --steps 3 --precision bf16 --peft lora
run qlora34b_4l --preset codellama-34b --layers 4 --seq 4096 --micro-batch 1 --micro-batches 2 --steps 3 --precision bf16 --peft qlora
python3 tools/bench/peft_memory.py 2>&1 | tail -30 | tee "$OUT/peft_memory.txt"
