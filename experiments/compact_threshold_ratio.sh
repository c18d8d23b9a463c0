#!/usr/bin/env bash
# Question: does a lower threshold ratio let one-edit compact memories answer more
# paraphrases without changing unrelated answers? Rescales every memory's threshold of the
# saved runs c1-mid40 and c1-last30 (docs/notebook/results/compact-memories; thresholds act
# at inference only) and scores the answers with `wise-edit inspect`.
# Decision: 0.8 is the compact preset's `routing.threshold_ratio`: paraphrases 17 -> 21 of
# 40 and 19 -> 22 of 30 answered exactly, every locality answer unchanged at 0.88, 0.8 and
# 0.7. Ran at 2f5f124 from a folder holding the two runs and their JSONL records.
set -e
for run in c1-last30:zsre-last30.jsonl c1-mid40:zsre-mid40.jsonl; do
  r=${run%%:*}; d=${run#*:}
  for ratio in 0.88 0.8 0.7; do
    rm -rf thr/$r-$ratio; mkdir -p thr/$r-$ratio; cp -r $r/checkpoint/editor thr/$r-$ratio/save
    python - thr/$r-$ratio/save $ratio <<'PY'
import json, sys
p = sys.argv[1] + "/editor_state.json"; ratio = float(sys.argv[2])
s = json.load(open(p))
for m in s["memories"]:
    m["epsilon"] = m["epsilon"] * ratio / 0.88
json.dump(s, open(p, "w"))
PY
    OMP_NUM_THREADS=1 wise-edit inspect --save thr/$r-$ratio/save --data $d --kinds prompt,rephrase,locality --out thr/$r-$ratio/answers.jsonl > thr/$r-$ratio/inspect.txt 2>&1
  done
done
