#!/usr/bin/env bash
# The main job, on a fresh CPU machine: set up, preprocess the bundled 4-task demo data into
# packed indexed datasets, run a small CodeLlama-architecture MFT (task-balanced loss) and plot
# each task's loss curve. A few minutes on 2 cores. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tools/setup_env.sh
OUT="${OUT:-outputs/demo}"
if [ -e "$OUT/run" ]; then  # an earlier run (or whatever else is there) is kept, never deleted
  KEPT="$OUT/run.$(date +%Y%m%d-%H%M%S).$$"
  mv "$OUT/run" "$KEPT"
  echo "note: the previous $OUT/run is kept as $KEPT"
fi
python tools/preprocess/preprocess_mft.py \
  --data-dir examples/demo_data/raw \
  --tokenizer-model examples/demo_data/tokenizer/demo_sp2048.model \
  --seq-length 1024 --packing best-fit --overlong drop \
  --output-dir "$OUT/data" --overwrite --no-progress
python -m megatron_mft.train --config examples/tiny_cpu.yaml \
  data.source=offline data.path="$OUT/data" output_dir="$OUT/run" "$@"
python -m megatron_mft.plot --metrics "$OUT/run/metrics.jsonl" --out "$OUT/run/loss.png"
echo "done: metrics $OUT/run/metrics.jsonl, checkpoints $OUT/run/checkpoints, plot $OUT/run/loss.png"
