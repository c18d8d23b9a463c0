# Experiment: Where do an edit's seconds go, phase by phase (cProfile)?
# Decided: ~81% is the fit's steps, so speed work cuts steps, not their cost; the hard negatives'
#   activations are computed once for a pool; Temporal's 210 s edits made tables34.sh train the bare
#   prompt with 2 rehearsed rows there
# Ran at: f26b81d, as benchmarks/profile_edit.py. Output: docs/notebook/results/profile-edit/
"""Where an edit's seconds go: edits with the current defaults (the setting of the
headline rows) under cProfile, each phase's time as a share of the edits' time.

    python benchmarks/profile_edit.py --edits 15
    python benchmarks/profile_edit.py --data temporal --edits 3

The first edit (which also generates the random prefixes, sets the score scale and
computes the hard-negative pool's activations once) is made before the profile starts
and is not counted; the pool's row therefore shows what it costs the later edits.
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
from common import HEADLINE, editing_parser, fresh_editor, overrides

from wise_edit.data import DATASETS, load_dataset

# (label, function, the caller it is counted under or None for every caller, whether the
# row is a part of the phase above it); the phases, not their parts, partition an edit
PHASES = (
    ("fit: the steps (forward + backward above the layer)", "_fit", None, False),
    ("edit rows: lower layers, once per edit", "_capture", "edit", False),
    ("draft: unrelated prompts, hard negatives, rehearsal", "_draft_for", None, False),
    ("  of which rehearsed rows' lower layers", "_rehearsal", None, True),
    ("  of which the hard-negative pool (built before)", "_negative_pool", None, True),
)


def phase_seconds(stats: pstats.Stats, name: str, caller: str | None) -> float:
    """Cumulative seconds of every function called ``name``, counted only under calls
    from a function called ``caller`` when one is given."""
    total = 0.0
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (_file, _line, func), (_cc, _nc, _tt, ct, callers) in entries:
        if func != name:
            continue
        if caller is None:
            total += ct
        else:
            total += sum(c[3] for key, c in callers.items() if key[2] == caller)
    return total


def main() -> None:
    parser = editing_parser(__doc__, edits=15)
    parser.add_argument("--data", default="zsre", choices=list(DATASETS))
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest calls")
    args = parser.parse_args()
    torch.manual_seed(0)
    editor = fresh_editor(args, {**HEADLINE, **overrides(args)})
    records = load_dataset(args.data, args.data_dir, limit=args.edits + 1)
    editor.edit(records[0].prompt, records[0].target, subject=records[0].subject)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    results = [editor.edit(r.prompt, r.target, subject=r.subject) for r in records[1:]]
    profile.disable()
    elapsed = time.perf_counter() - started
    stats = pstats.Stats(profile)
    n = len(results)
    print(
        f"{n} {args.data} edits on {args.model} ({args.device}), torch threads "
        f"{torch.get_num_threads()}: {elapsed / n:.2f} s/edit under the profiler, "
        f"{sum(r.steps for r in results) / n:.1f} steps/edit"
    )
    edits_total = phase_seconds(stats, "edit", None)
    rows = [
        (label, phase_seconds(stats, name, caller), part) for label, name, caller, part in PHASES
    ]
    rest = edits_total - sum(seconds for _, seconds, part in rows if not part)
    rows.append(("the rest (commits, bookkeeping)", rest, False))
    for label, seconds, _ in rows:
        print(f"{label:<52}{seconds / n:>8.3f} s/edit{seconds / edits_total:>8.1%}")
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
