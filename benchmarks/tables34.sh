#!/usr/bin/env bash
# The paper's Tables 3-4 on the bundled model: Temporal (T = 75, OOD Gen) and
# Hallucination (T = 600, perplexity of the edits), WISE in the headline setting and the
# four baselines, each a resumable `wise-edit bench` run. Run it again to continue: a
# method whose results are kept (KEEP/<run>/results.json) or whose results.json exists is
# skipped, one with a checkpoint is resumed. A finished run's results.{json,md} are
# copied to KEEP (default docs/notebook/results/tables34, in the repository), so that a session
# can commit each run as it finishes: OUT (runs/, ignored by git) does not survive a fresh
# checkout, and a run of this table takes hours. The unedited model's scores of a set,
# when committed as KEEP/<set>-T<T>-raw-protocol.json (Temporal's took ~45 CPU-minutes:
# its answers run to ~100 tokens), are borrowed by every method (--pre-edit-from);
# otherwise the WISE run computes them and the baselines borrow them from it. When every
# run is kept, the table (`wise-edit compare`, with each set's own metric: perplexity of
# the edits, OOD Gen) is written to KEEP/tables34.md; until then each call prints the
# kept runs' table.
#
#   OMP_NUM_THREADS=1 nohup bash benchmarks/tables34.sh > runs/tables34.log 2>&1 &
#
# WISE runs in the headline setting (Retrieve, 5 edits per memory, replay), except that on
# these long-form sets it trains the bare prompt alone (no random prefixes) and rehearses
# at most two of its memory's earlier edits: a Temporal target is a ~130-token paragraph,
# and with the 10 prefixes and 4 rehearsed rows an edit took 210 s alone at two threads (2
# prefixes: 116 s at one thread), ~4.4 h for T = 75; a Hallucination edit (a ~70-token
# passage, a ~30-token sentence) took 40-180 s at one thread (43 edits in 2 h, ~24 h for
# T = 600), and without the prefixes still 22 s alone at two threads (the first 7 edits,
# 7-70 steps each; ~3.7 h for T = 600): each more than a session holds, so a Hallucination
# edit also stops after at most 20 steps (its s/edit and steps/edit are in its results).
# The baselines take the same cap there: uncapped, GRACE and DEFER spend all of their 100
# steps (as on Temporal, 50-67 s/edit there) and FT-L its 50, ~12 h for the three
# (estimated from their seconds per step).
#
# A run longer than a session can be carried to the next one: `bash benchmarks/tables34.sh
# carry` copies each unfinished run's last checkpoint of at most CARRY_MB (default 8: a
# baseline's state is one layer, ~4 MB; WISE's side memories, 3.5 MB each, soon outgrow
# it) to KEEP/<run>/checkpoint, to be committed. A later call that finds no
# checkpoint in OUT resumes from the carried one, and deletes it once the run is kept.
#
# Settings: OUT (default runs/tables34), KEEP (default docs/notebook/results/tables34), SETS
# (default "temporal:75 hallucination:600"), METHODS (default "wise grace defer ft-l
# ft-ewc"), EVERY (checkpoint every N edits), CARRY_MB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tables34}
KEEP=${KEEP:-docs/notebook/results/tables34}
GRID_SETS="temporal:75 hallucination:600"  # the paper's grid, which the table covers
GRID_METHODS="wise grace defer ft-l ft-ewc"
SETS=${SETS:-$GRID_SETS}
METHODS=${METHODS:-$GRID_METHODS}
EVERY=${EVERY:-15}
CARRY_MB=${CARRY_MB:-8}
mkdir -p "$OUT" "$KEEP"

run_name() {  # run_name DATA T METHOD: a run's folder name, in OUT and in KEEP
    echo "$1-T$2-raw-$3"
}

edits_done() {  # edits_done CHECKPOINT: how many edits it holds (-1 without one)
    [[ -d $1/editor ]] || { echo -1; return; }
    # one "index" key per entry of the edit log; JSON escapes quotes inside strings
    { grep -o '"index":' "$1/editor/editor_state.json" 2>/dev/null || true; } | wc -l
}

carry() {  # carry DATA T METHOD: the unfinished run's checkpoint into KEEP
    local name
    name=$(run_name "$@")
    local from="$OUT/$name/checkpoint" to="$KEEP/$name/checkpoint"
    [[ -d $from/editor && ! -f $OUT/$name/results.json ]] || return 0
    local mb
    mb=$(du -sm "$from" | cut -f1)
    if (( mb > CARRY_MB )); then
        echo "not carried: $from ($mb MB > CARRY_MB=$CARRY_MB)"
        return
    fi
    rm -rf "$to.new" && mkdir -p "$(dirname "$to")"
    cp -r "$from" "$to.new" && rm -f "$to.new"/.*.lock
    rm -rf "$to" && mv "$to.new" "$to"
    echo "carried: $to ($mb MB; commit it)"
}

run() {  # run DATA T METHOD
    local data=$1 t=$2 method=$3
    local name
    name=$(run_name "$@")
    local out="$OUT/$name" wise="$OUT/$(run_name "$data" "$t" wise)" keep="$KEEP/$name"
    if [[ -f $keep/results.json ]]; then
        echo "kept: $keep"
        return
    fi
    if [[ ! -f $out/results.json ]]; then
        local args=(--device cpu --model smollm2-135m --data "$data" --edits "$t" --format raw
            --checkpoint-every "$EVERY" --out "$out")
        if [[ $method == wise ]]; then
            args+=(--mode retrieve --set shard_size=5 --set replay=true)
            [[ $data == temporal || $data == hallucination ]] &&
                args+=(--set prefix_count=0 --set rehearse_rows=2)
        else
            args+=(--method "$method")
        fi
        # every Hallucination edit stops after at most 20 steps, WISE's and the
        # baselines' alike; FT-EWC, run before the baselines got the cap, kept its own 100
        # (23.6 steps on average; its results record the command it ran)
        [[ $data == hallucination && $method != ft-ewc ]] && args+=(--set max_steps=20)
        # the carried checkpoint wins where it is further on than OUT's (or OUT has none):
        # a session that finds an older run of its own in OUT must not redo the edits
        # another session carried past it
        if [[ -d $keep/checkpoint ]] &&
            (( $(edits_done "$keep/checkpoint") > $(edits_done "$out/checkpoint") )); then
            rm -rf "$out/checkpoint" && mkdir -p "$out"
            cp -r "$keep/checkpoint" "$out/checkpoint"
            echo "resuming from the carried $keep/checkpoint"
        fi
        # the unedited model's scores: committed, or the WISE run's (computed once a set)
        local pre="$KEEP/$data-T$t-raw-protocol.json"
        if [[ -d $out/checkpoint ]]; then
            args+=(--resume)
        elif [[ -f $pre ]]; then
            args+=(--pre-edit-from "$pre")
        elif [[ $method != wise ]]; then
            args+=(--pre-edit-from "$wise")
        fi
        echo "$(date -u +%FT%TZ) start: $out"
        python -m wise_edit.cli bench "${args[@]}" > "$out.log" 2>&1
        echo "$(date -u +%FT%TZ) done: $out"
    fi
    mkdir -p "$keep"
    cp "$out"/results.json "$out"/results.md "$keep"/
    rm -rf "$keep/checkpoint"
    echo "kept: $keep (commit it)"
}

action=run
[[ ${1:-} == carry ]] && action=carry
for entry in $SETS; do
    for method in $METHODS; do
        "$action" "${entry%%:*}" "${entry##*:}" "$method"
    done
done
[[ $action == carry ]] && exit 0

# the table: every set and method of the paper's, whichever of them this call ran
runs=() kept=()
for entry in $GRID_SETS; do
    for method in $GRID_METHODS; do
        runs+=("$KEEP/$(run_name "${entry%%:*}" "${entry##*:}" "$method")")
        [[ -f ${runs[-1]}/results.json ]] && kept+=("${runs[-1]}")
    done
done
if (( ${#kept[@]} < ${#runs[@]} )); then
    echo "${#kept[@]} of ${#runs[@]} runs kept; the table so far:"
    (( ${#kept[@]} )) && python -m wise_edit.cli compare "${kept[@]}"
    exit 0
fi
python -m wise_edit.cli compare "${runs[@]}" --out "$KEEP/tables34.md"
