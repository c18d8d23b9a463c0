#!/usr/bin/env bash
# the saved ZsRE T = 1000 run (gate config) evaluated again at HEAD: batched decoding,
# two-layer subject keys, index-based routing report
cd /work/main
export OMP_NUM_THREADS=1
echo "$(date -u +%FT%TZ) zsre1000-head start at $(git rev-parse --short HEAD)"
wise-edit bench --device cpu --model smollm2-135m --data zsre --edits 1000 --format raw --mode retrieve --set shard_size=5 --set replay=true --eval-sample 200 --checkpoint-every 100 --out runs/zsre1000-head --resume > runs/zsre1000-head.log 2>&1
echo "$(date -u +%FT%TZ) zsre1000-head rc=$?"
