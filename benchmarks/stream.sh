#!/usr/bin/env bash
# One long CounterFact stream with the defaults (no flags), scored at its end and at the
# milestones on the way, then plotted: answer EM, forward latency and memory per edit
# against T. Each milestone is the stream's own editor after its first N edits (the
# checkpoint copied when it holds exactly N), scored on a seeded sample of those N
# records by an eval-only `wise-edit bench --resume` of the copy, beside the stream as
# soon as it is copied; so every point is the same stream, not a separate shorter run.
#
#   OMP_NUM_THREADS=1 nohup bash benchmarks/stream.sh > runs/stream.log 2>&1 &
#
# Run it again to continue: the stream resumes from its checkpoint, milestones already
# copied or scored are kept. Settings: OUT (default runs/stream), EDITS (10000),
# MILESTONES ("100 1000 3000"; each a multiple of EVERY), EVERY (checkpoint every N edits,
# default 100), SAMPLE (records scored per point, 500), DATA (counterfact), POLL (seconds
# between looks at the checkpoint, 10).
# A milestone copied by an earlier code version is scored by the code checked out now;
# the copy's edit log keeps each edit's seconds, so s/edit is the stream's own.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/stream}
EDITS=${EDITS:-10000}
MILESTONES=${MILESTONES:-"100 1000 3000"}
EVERY=${EVERY:-100}
SAMPLE=${SAMPLE:-500}
DATA=${DATA:-counterfact}
POLL=${POLL:-10}
mkdir -p "$OUT"
stream="$OUT/$DATA-T$EDITS-defaults"

for m in $MILESTONES; do
    if (( m % EVERY )); then
        echo "milestone $m is not a multiple of EVERY=$EVERY: its checkpoint never exists" >&2
        exit 2
    fi
done

edits_in() {  # edits_in EDITOR_FOLDER: how many edits its log holds
    { grep -o '"index":' "$1/editor_state.json" 2>/dev/null || true; } | wc -l
}

score() {  # score M: the eval-only bench of milestone M's copy (once)
    local point="$OUT/$DATA-T$1-of-$EDITS"
    [[ -f $point/results.json ]] && return 0
    echo "$(date -u +%FT%TZ) scoring T = $1"
    wise-edit bench --data "$DATA" --edits "$1" --eval-sample "$SAMPLE" --out "$point" \
        --resume > "$point.log" 2>&1 || echo "scoring T = $1 FAILED (see $point.log)"
}

copy_milestones() {  # while the stream runs: copy (then score) each milestone's checkpoint
    local m dest
    while kill -0 "$1" 2> /dev/null; do
        for m in $MILESTONES; do
            dest="$OUT/$DATA-T$m-of-$EDITS/checkpoint/editor"
            [[ -d $dest ]] && continue
            if [[ $(edits_in "$stream/checkpoint/editor") == "$m" ]]; then
                rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
                cp -r "$stream/checkpoint/editor/." "$dest.tmp/"
                # a save that landed during the copy is caught here
                if [[ $(edits_in "$dest.tmp") == "$m" ]]; then
                    rm -f "$dest.tmp"/.*.lock && mv "$dest.tmp" "$dest"
                    echo "$(date -u +%FT%TZ) copied the editor at T = $m"
                    score "$m" &
                else
                    rm -rf "$dest.tmp"
                fi
            fi
        done
        sleep "$POLL"
    done
}

if [[ ! -f $stream/results.json ]]; then
    echo "$(date -u +%FT%TZ) stream: $stream"
    wise-edit bench --data "$DATA" --edits "$EDITS" --eval-sample "$SAMPLE" \
        --checkpoint-every "$EVERY" --out "$stream" --resume > "$stream.log" 2>&1 &
    pid=$!
    copy_milestones "$pid"
    wait "$pid" || { echo "stream FAILED (see $stream.log)"; exit 1; }
fi
wait  # milestones still being scored

for m in $MILESTONES; do  # copied by an earlier call and not scored yet
    if [[ -d $OUT/$DATA-T$m-of-$EDITS/checkpoint/editor ]]; then
        score "$m"
    elif [[ ! -f $OUT/$DATA-T$m-of-$EDITS/results.json ]]; then
        echo "no copy of the editor at T = $m (the stream had passed it when this started)"
    fi
done

python benchmarks/plot_stream.py "$OUT"/"$DATA"-T*-of-"$EDITS" "$stream" \
    --out "$OUT/$DATA-stream.png"
