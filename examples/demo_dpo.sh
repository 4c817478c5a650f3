#!/usr/bin/env bash
# Stage 2 of the demo, after examples/demo.sh (stage 1, SFT): preprocess the bundled demo
# preference pairs (examples/demo_data/preference) and run DPO (LoRA; reference = the same model
# with its adapters disabled) from the SFT run's last checkpoint, then plot. A few minutes on
# 2 cores. Extra arguments are config overrides (e.g. train.stage=orpo, or peft.method=none for
# full fine-tuning, loss.preference.reference=frozen).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tools/setup_env.sh
OUT="${OUT:-outputs/demo}"
SFT="$OUT/run/checkpoints/step_0000060"
if [ ! -d "$SFT" ]; then
  echo "error: no SFT checkpoint at $SFT; run examples/demo.sh first (with the same OUT)" >&2
  exit 2
fi
if [ -e "$OUT/dpo" ]; then  # an earlier run (or whatever else is there) is kept, never deleted
  KEPT="$OUT/dpo.$(date +%Y%m%d-%H%M%S).$$"
  mv "$OUT/dpo" "$KEPT"
  echo "note: the previous $OUT/dpo is kept as $KEPT"
fi
python tools/preprocess/preprocess_mft.py --mode preference \
  --data-dir examples/demo_data/preference \
  --tokenizer-model examples/demo_data/tokenizer/demo_sp2048.model \
  --seq-length 1024 --packing best-fit --overlong drop \
  --output-dir "$OUT/pairs" --overwrite --no-progress
python -m megatron_mft.train --config examples/tiny_cpu_dpo.yaml \
  data.path="$OUT/pairs" train.init_checkpoint="$SFT" output_dir="$OUT/dpo" "$@"
python -m megatron_mft.plot --metrics "$OUT/dpo/metrics.jsonl" --out "$OUT/dpo/loss.png"
echo "done: metrics $OUT/dpo/metrics.jsonl, checkpoints $OUT/dpo/checkpoints, plot $OUT/dpo/loss.png"
