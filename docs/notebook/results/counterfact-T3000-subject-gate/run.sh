#!/usr/bin/env bash
# the saved CounterFact T = 3000 run evaluated again with the subject gate (tau .6, layer 2),
# its subject keys rebuilt from the edit log on load (at 52f5094: two layers per key)
cd /work/main
export OMP_NUM_THREADS=1
echo "$(date -u +%FT%TZ) cf3000-gate start at $(git rev-parse --short HEAD)"
wise-edit bench --device cpu --model smollm2-135m --data counterfact --edits 3000 --format raw --mode retrieve --set shard_size=5 --set replay=true --eval-sample 200 --checkpoint-every 100 --out runs/cf3000-gate --resume > runs/cf3000-gate.log 2>&1
echo "$(date -u +%FT%TZ) cf3000-gate rc=$?"
