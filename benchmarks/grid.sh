# Shared by the table scripts (tables34.sh, table2.sh): a grid of resumable `wise-edit
# bench` runs, each kept (results.{json,md} copied to KEEP, in the repository) once it
# finishes, so that a session can commit each run as it arrives; OUT (runs/, ignored by
# git) does not survive a fresh checkout. Source it after setting OUT, KEEP, EVERY,
# CARRY_MB and FORMAT, and defining
#   run_name DATA T METHOD     the run's folder name, in OUT and in KEEP
#   method_args DATA T METHOD  the bench flags that make METHOD (appended to ARGS)
# PRE_METHOD names the method whose run computes the unedited model's scores of a set
# and T; the other methods borrow them (--pre-edit-from), as they do a committed
# KEEP/<set>-T<T>-<FORMAT>-protocol.json.

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
    local out="$OUT/$name" first="$OUT/$(run_name "$data" "$t" "$PRE_METHOD")" keep="$KEEP/$name"
    if [[ -f $keep/results.json ]]; then
        echo "kept: $keep"
        return
    fi
    if [[ ! -f $out/results.json ]]; then
        ARGS=(--device cpu --model smollm2-135m --data "$data" --edits "$t" --format "$FORMAT"
            --checkpoint-every "$EVERY" --out "$out")
        method_args "$data" "$t" "$method"
        # the carried checkpoint wins where it is further on than OUT's (or OUT has none):
        # a session that finds an older run of its own in OUT must not redo the edits
        # another session carried past it
        if [[ -d $keep/checkpoint ]] &&
            (( $(edits_done "$keep/checkpoint") > $(edits_done "$out/checkpoint") )); then
            rm -rf "$out/checkpoint" && mkdir -p "$out"
            cp -r "$keep/checkpoint" "$out/checkpoint"
            echo "resuming from the carried $keep/checkpoint"
        fi
        # the unedited model's scores: committed, or PRE_METHOD's run's (computed once)
        local pre="$KEEP/$data-T$t-$FORMAT-protocol.json"
        if [[ -d $out/checkpoint ]]; then
            ARGS+=(--resume)
        elif [[ -f $pre ]]; then
            ARGS+=(--pre-edit-from "$pre")
        elif [[ $method != "$PRE_METHOD" && -f $first/checkpoint/protocol.json ]]; then
            ARGS+=(--pre-edit-from "$first")
        fi
        echo "$(date -u +%FT%TZ) start: $out"
        if ! python -m wise_edit.cli bench "${ARGS[@]}" > "$out.log" 2>&1; then
            echo "$(date -u +%FT%TZ) FAILED: $out (see $out.log)"
            return 0
        fi
        echo "$(date -u +%FT%TZ) done: $out"
    fi
    mkdir -p "$keep"
    cp "$out"/results.json "$out"/results.md "$keep"/
    rm -rf "$keep/checkpoint"
    echo "kept: $keep (commit it)"
}

table() {  # table OUTFILE RUN...: the kept runs' table, written once every run is kept
    local file=$1 kept=()
    shift
    for r in "$@"; do [[ -f $r/results.json ]] && kept+=("$r"); done
    if (( ${#kept[@]} < $# )); then
        echo "${#kept[@]} of $# runs kept; the table so far:"
        (( ${#kept[@]} )) && python -m wise_edit.cli compare "${kept[@]}"
        return 0
    fi
    python -m wise_edit.cli compare "$@" --out "$file"
}
