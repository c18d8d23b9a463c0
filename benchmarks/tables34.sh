#!/usr/bin/env bash
# The paper's Tables 3-4 on the bundled model: Temporal (T = 75, OOD Gen) and
# Hallucination (T = 600, perplexity of the edits), WISE in the headline setting and the
# four baselines, each a resumable `wise-edit bench` run. Run it again to continue: a
# method whose results.json exists is skipped, one with a checkpoint is resumed. The
# unedited model's scores are computed once per set (by the WISE run) and borrowed by the
# baselines (--pre-edit-from). When every run is done, the table (`wise-edit compare`, with
# each set's own metric: perplexity of the edits, OOD Gen) is written to OUT/tables34.md.
# A set's pre-edit scores committed as docs/results/tables34/<set>-T<T>-raw-protocol.json
# (Temporal's took ~45 CPU-minutes: its answers run to ~100 tokens) are borrowed.
#
#   OMP_NUM_THREADS=1 nohup bash benchmarks/tables34.sh > runs/tables34.log 2>&1 &
#
# Settings: OUT (default runs/tables34), SETS (default "temporal:75 hallucination:600"),
# METHODS (default "wise grace defer ft-l ft-ewc"), EVERY (checkpoint every N edits).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tables34}
SETS=${SETS:-"temporal:75 hallucination:600"}
METHODS=${METHODS:-"wise grace defer ft-l ft-ewc"}
EVERY=${EVERY:-15}
mkdir -p "$OUT"

run() {  # run DATA T METHOD
    local data=$1 t=$2 method=$3
    local out="$OUT/$data-T$t-raw-$method" wise="$OUT/$data-T$t-raw-wise"
    if [[ -f $out/results.json ]]; then
        echo "done: $out"
        return
    fi
    local args=(--device cpu --model smollm2-135m --data "$data" --edits "$t" --format raw
        --checkpoint-every "$EVERY" --out "$out")
    if [[ $method == wise ]]; then
        args+=(--mode retrieve --set shard_size=5 --set replay=true)
        # the unedited model's scores, when a session already computed them
        local pre="docs/results/tables34/$data-T$t-raw-protocol.json"
        [[ -f $pre && ! -d $out/checkpoint ]] && args+=(--pre-edit-from "$pre")
    else
        args+=(--method "$method" --pre-edit-from "$wise")
    fi
    [[ -d $out/checkpoint ]] && args+=(--resume)
    echo "$(date -u +%FT%TZ) start: $out"
    python -m wise_edit.cli bench "${args[@]}" > "$out.log" 2>&1
    echo "$(date -u +%FT%TZ) done: $out"
}

for entry in $SETS; do
    for method in $METHODS; do
        run "${entry%%:*}" "${entry##*:}" "$method"
    done
done

runs=()
for entry in $SETS; do
    for method in $METHODS; do
        runs+=("$OUT/${entry%%:*}-T${entry##*:}-raw-$method")
    done
done
python -m wise_edit.cli compare "${runs[@]}" --out "$OUT/tables34.md"
