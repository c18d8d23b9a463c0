#!/usr/bin/env bash
# gemma3-270m, the last 30 ZsRE records: every memory's threshold rescaled from the
# preset's ratio 0.8 (thresholds act at inference only), answers read with inspect.
set -e
for ratio in 0.9 1.0; do
  rm -rf r$ratio; mkdir -p r$ratio; cp -r ../gemma-zsre-last30/checkpoint/editor r$ratio/save
  python - r$ratio/save $ratio <<'PY'
import json, sys
p = sys.argv[1] + "/editor_state.json"; ratio = float(sys.argv[2])
s = json.load(open(p))
for m in s["memories"]:
    if m["epsilon"] is not None:
        m["epsilon"] = m["epsilon"] * ratio / 0.8
json.dump(s, open(p, "w"))
PY
  OMP_NUM_THREADS=1 WISE_EDIT_DATA=/work/shared/data wise-edit inspect --model gemma3-270m --save r$ratio/save --data /work/runs/zsre-last30.jsonl --kinds prompt,rephrase,locality --out r$ratio/answers.jsonl > r$ratio/inspect.txt 2>&1
done
