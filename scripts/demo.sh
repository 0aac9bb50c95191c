#!/usr/bin/env bash
# Install everything, train the default emoji64 preset for a few minutes on the CPU,
# then sample a grid from it and say where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
MINUTES=${MINUTES:-5}
RUN=${RUN:-runs/emoji64-demo}
mdm train emoji64 run_dir="$RUN" train.max_minutes="$MINUTES"
mdm sample "$RUN" --num 16 --out "$RUN/demo"
echo "demo samples: $RUN/demo/grid_64px.png (and grid_16px.png for the inner level)"
