#!/usr/bin/env bash
# Compare settings of the nested stage from one and the same trained first stage.
#
#   bash benchmarks/fork_at_growth.sh RUN NAME MINUTES [KEY=VALUE ...]
#
# Copies the progressive run RUN to $OUT/NAME (default OUT=runs/forks), keeps only its checkpoints up to
# the end of its first stage (a run still in its first stage grows at its newest checkpoint), writes the KEY=VALUE settings into the copy's config.yaml (these may be
# settings an existing run cannot change, e.g. diffusion.loss_weighting or stages.1.lr), resumes it for
# MINUTES of training (OMP_NUM_THREADS threads, default 1) and prints its FD at every level
# (N=128 DPM++(2M)-25 samples against REF, default the emoji set's statistics in $OUT/emoji-ref.npz).
set -euo pipefail
src=$1 name=$2 minutes=$3
shift 3
out=${OUT:-runs/forks}
ref=${REF:-$out/emoji-ref.npz}
dst=$out/$name
mkdir -p "$out"
[[ -f "$ref" ]] || mdm eval-stats emoji --resolution 64 --levels 64,16 --feature effnet-lite0 --out "$ref"
rm -rf "$dst" && cp -r "$src" "$dst" && rm -rf "$dst/eval" "$dst/checkpoints/latest"
# The first stage ended where the second began (end_step is recorded only when minutes ended it).
boundary=$(python -c "import json, sys; s = json.load(open(sys.argv[1])); print(s[1]['start_step'] if len(s) > 1 else '')" \
  "$dst/stages.json")
if [[ -z "$boundary" ]]; then  # still in its first stage: end that stage at its newest checkpoint, grow now
  newest=$(ls -d "$dst"/checkpoints/step_* | sort | tail -1)
  boundary=$((10#${newest##*step_}))
  set -- "stages.0.steps=$boundary" "$@"
fi
for checkpoint in "$dst"/checkpoints/step_*; do
  (( 10#${checkpoint##*step_} > boundary )) && rm -rf "$checkpoint"
done
python - "$dst/config.yaml" "$@" <<'PY'
import sys

import yaml

path, settings = sys.argv[1], sys.argv[2:]
config = yaml.safe_load(open(path))
for setting in settings:
    key, value = setting.split("=", 1)
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[int(part) if isinstance(node, list) else part]
    node[int(last) if isinstance(node, list) else last] = yaml.safe_load(value)
yaml.safe_dump(config, open(path, "w"), sort_keys=False)
PY
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mdm train --resume "$dst" train.max_minutes="$minutes" > "$dst.log" 2>&1
mdm eval "$dst" --reference "$ref" --feature effnet-lite0 --num 128 --metrics fd --sampler dpm++2m --steps 25 \
  --out "$dst.json" >> "$dst.log" 2>&1
python -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], 'step', r['step'], r['metrics'])" \
  "$dst.json" "$name"
