#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared script for the device tool: one H100/H200, Python
# 3.12, PyTorch (CUDA) 2.11, transformers + peft preinstalled; no megatron-core, TE, flash-attn or
# internet there. Time: no step starts after BUDGET_S (450 s) but the summary, and each step has its
# own limit below, so at most about 9.5 minutes; on one H200 the whole call took 5.0 minutes
# (docs/performance.md "GPU").
#
#   1. placement   every variant the recipes build (full/LoRA/QLoRA x each attention backend
#                  importable there), built as the recipe does on CUDA: every parameter, buffer
#                  and NF4 code on the GPU, then one packed and one dynamic step each
#   2. isolation   each packed document's per-token CE == the document alone in a padded row, at
#                  the same weights, fp32 and bf16 (negative control: the documents run as one)
#   3. hf-parity   megatron logits vs transformers' on CUDA, both against transformers in float64:
#                  fp32 within 2 x transformers' own fp32 error, bf16 within 1.5 x its bf16 + 0.02
#   4. wgrad       the weight gradient accumulated into fp32 main_grad in one GEMM, vs float64
#      oom         a real CUDA out-of-memory error is recognised and worded by the trainer's message
#   5. bench       CodeLlama-34B-shaped layers (4 of 48, hidden 8192), seq 4096, bf16: full (also
#                  with the bf16 weight gradient then an add, the A/B), LoRA and QLoRA packed, full
#                  and LoRA dynamic: tokens/s, model and hardware TFLOP/s, MFU, peak memory (FLOPs
#                  from megatron_mft.training.metrics.flop_count); full and QLoRA profiled
#   6. hf-loop     the same layers and documents through a plain transformers loop
#   7. summary     QLoRA/LoRA step-time ratio (target <= 1.3), packed vs dynamic, engine vs the
#                  transformers loop, fused vs unfused weight gradient, a markdown table
#
# Prepare here (not on the device; .whl/ is git-ignored), from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     megatron-core==0.16.1 bitsandbytes==0.50.2
# (megatron-core: the cp312 wheel, it has a compiled helper; bitsandbytes: py3-none manylinux with
# its CUDA libraries, ~43 MB; both together stay under the device tool's 64 MiB carry limit.)
# Then: device run, carry [".whl"], command "bash tests/gpu/run_gpu_checks.sh", timeout_s 590.
# Results: $OUT/log.txt, $OUT/summary.md and $OUT/results.tgz (every check's JSON, the profiles,
# versions). Put the figures, with the card, in docs/performance.md.
#
# ONLY="hf-parity wgrad" bash tests/gpu/run_gpu_checks.sh   runs those steps (and the summary) alone.
# DRY_RUN=1 bash tests/gpu/run_gpu_checks.sh   runs the same Python on the CPU with tiny shapes
# (this repository's .venv, nothing installed): it checks the script, its figures mean nothing.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
# the device tool brings back at most 8 files from $OUT: the checks write into RES, and $OUT gets
# log.txt (as it is written), summary.md and results.tgz (everything, made on exit)
RES="${RES:-/tmp/gpu_results}"; rm -rf "$RES"; mkdir -p "$RES"
BUDGET_S="${BUDGET_S:-450}"  # no step starts after this many seconds (the call's own limit must not cut the tar)
trap 'cp -f "$RES/summary.md" "$OUT/" 2>/dev/null; tar czf "$OUT/results.tgz" -C "$RES" .' EXIT
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY=()
SCALE=1  # time limits below are for the GPU; the CPU dry run (a shared, slow CPU) gets 10x
if [ "${DRY_RUN:-0}" = 1 ]; then
  . .venv/bin/activate
  DRY=(--dry-run)
  SCALE=10
  PY=python
else
  PY=python3
  ls .whl/megatron_core-*.whl .whl/bitsandbytes-*.whl >/dev/null \
    || { echo "missing wheels in .whl/ (see header)"; exit 2; }
  # install next to the preinstalled torch; --no-deps: torch, numpy, packaging are there already
  "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
fi
"$PY" -c "import torch, megatron.core, bitsandbytes, transformers, peft; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'megatron-core', megatron.core.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$RES/versions.txt" || exit 1

FAILED=()
step() {  # step NAME TIMEOUT_S ARGS...: one check, its own process and time limit
  local name=$1 limit=$(($2 * SCALE)); shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY summary " != *" $name "* ]]; then return; fi
  if [ "$name" != summary ] && [ $SECONDS -ge $((BUDGET_S * SCALE)) ]; then
    echo "== $name: skipped (budget spent)"; FAILED+=("$name(skipped)"); return
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$PY" tests/gpu/gpu_checks.py "$@" --out "$RES" "${DRY[@]}"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ $rc = 0 ] || FAILED+=("$name(exit $rc)")
}
step placement 90 placement
step isolation 60 isolation
step hf-parity 90 hf-parity
step wgrad 45 wgrad
step oom 30 oom
step bench-full-packed 90 bench --peft none --batching packed --profile
step bench-full-packed-unfused-wgrad 75 bench --peft none --batching packed --wgrad unfused --profile
step bench-lora-packed 60 bench --peft lora --batching packed
step bench-qlora-packed 90 bench --peft qlora --batching packed --profile
step bench-lora-dynamic 60 bench --peft lora --batching dynamic
step bench-full-dynamic 60 bench --peft none --batching dynamic
step hf-loop 75 hf-bench
step summary 30 summary
echo "failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
