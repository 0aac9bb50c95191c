#!/usr/bin/env bash
# Install everything, train the default emoji64 preset for a few minutes on the CPU,
# then sample a grid from it, measure how good it is, and say where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
MINUTES=${MINUTES:-10}
RUN=${RUN:-runs/emoji64-demo}
EVAL=${EVAL:-1}
# Each demo writes a folder of its own, so running it again (which resumes the run) keeps the last one.
OUT="$RUN/demo/$(date +%Y%m%d-%H%M%S)"
# The minutes end the demo, not the preset's 12,000 steps (reached after ~68 minutes on a 2-core CPU).
if [[ -f "$RUN/config.yaml" ]]; then
  # Running it again continues the run with the settings it began with (a newer preset may differ).
  mdm train --resume "$RUN" train.max_minutes="$MINUTES" train.steps=1000000
else
  mdm train emoji64 run_dir="$RUN" train.max_minutes="$MINUTES" train.steps=1000000
fi
mdm sample "$RUN" --num 16 --out "$OUT"
if [[ "$EVAL" == 1 ]]; then
  # FD_effnet-lite0 of 128 samples at every level against 1,000 emoji (statistics made once, ~2 min).
  REF=${REF:-$HOME/.cache/matryoshka/emoji64-ref-1000.npz}
  [[ -f "$REF" ]] || mdm eval-stats emoji --run "$RUN" --feature effnet-lite0 --max-images 1000 --out "$REF"
  mdm eval "$RUN" --reference "$REF" --num 128 --metrics fd --out "$OUT/eval.json"
fi
echo "demo samples: $OUT/grid_64px.png (and grid_16px.png for the inner level)"
