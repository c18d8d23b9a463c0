#!/usr/bin/env bash
# The paper's Table 2 (ZsRE, sequential editing at T = 1, 10, 100, 1000) on the bundled
# model, with every editor of the paper plus AlphaEdit, and its Table 7 (WISE without
# its router, "wise-no-router": `--set routing.gate=false`). Each editor runs with its
# defaults, WISE included (no flags: the product's setting), in chat form (the bundled
# model is a chat model; `--format auto` picks chat). MEMIT-MASS is MEMIT given all T
# edits as one batch. Each cell is a resumable `wise-edit bench` run (benchmarks/grid.sh):
# run the script again to continue; finished runs are kept in KEEP and committed, an
# unfinished one can be carried to the next session (`bash benchmarks/table2.sh carry`).
# The unedited model's scores of each T are computed by the WISE run and borrowed by the
# others.
#
#   OMP_NUM_THREADS=1 nohup bash benchmarks/table2.sh > runs/table2.log 2>&1 &
#   T_LIST="1 10" METHODS="rome memit" bash benchmarks/table2.sh   # a part of the grid
#
# Settings: OUT (default runs/table2), KEEP (default docs/notebook/results/table2),
# T_LIST (default "1 10 100 1000"), METHODS (default: all eleven rows), EVERY (checkpoint
# every N edits, default 25), CARRY_MB (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/table2}
KEEP=${KEEP:-docs/notebook/results/table2}
GRID_T="1 10 100 1000"
GRID_METHODS="wise wise-no-router ft-l ft-ewc mend rome memit memit-mass alphaedit grace defer"
T_LIST=${T_LIST:-$GRID_T}
METHODS=${METHODS:-$GRID_METHODS}
EVERY=${EVERY:-25}
CARRY_MB=${CARRY_MB:-8}
FORMAT=chat
PRE_METHOD=wise
mkdir -p "$OUT" "$KEEP"
# shellcheck source=benchmarks/grid.sh
source benchmarks/grid.sh

run_name() {
    echo "$1-T$2-chat-$3"
}

method_args() {  # method_args DATA T METHOD
    case $3 in
        wise) ;;
        wise-no-router) ARGS+=(--set routing.gate=false) ;;
        *) ARGS+=(--method "$3") ;;
    esac
}

action=run
[[ ${1:-} == carry ]] && action=carry
for t in $T_LIST; do
    for method in $METHODS; do
        "$action" zsre "$t" "$method"
    done
done
[[ $action == carry ]] && exit 0

runs=()
for t in $GRID_T; do
    for method in $GRID_METHODS; do
        runs+=("$KEEP/$(run_name zsre "$t" "$method")")
    done
done
table "$KEEP/table2.md" "${runs[@]}"
