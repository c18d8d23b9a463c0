"""Seconds per edit of named editing settings, measured in one run on the same ZsRE records
(each setting edits them from a fresh editor, one after the other; medians over the edits).

    python benchmarks/edit_speed.py --edits 50 --settings before,stop005,now
    python benchmarks/edit_speed.py --edits 20 --settings now,full  # fast path vs full forward

Settings (on top of the common ones, ``--set`` adds more):
  before  plain SGD at lr 1 (the paper), stop once the whole loss stays under 0.05
  now     the defaults: Adam, stop once every target token is the greedy choice and the
          routing margins are under 0.2, side steps on the margins once the answer settled
  stop005 the defaults, with the routing margins under 0.05 (the defaults until that
          bound was measured at T = 100)
  full    the defaults without the fast path (the whole model every step)
  rows5   the defaults with 5 random prefixes instead of 10 (fewer rows per step)
  patience1 the defaults, stopping on the first step that meets the stop rule (not two)
  noside  the defaults without side steps (side_steps = 0: every update a full step; the
          defaults until side steps were measured)

"side/edit" counts the updates on the routing margins alone (``side_steps``), beside the
steps (forwards). "answered at" is the median step at which every target token first was
the greedy choice; the steps after it go to the routing margins and the stop's patience.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from common import HEADLINE, add_settings, chosen_settings, editing_parser, fresh_editor, overrides

from wise_edit.data import load_zsre

SETTINGS: dict[str, dict[str, Any]] = {
    "before": {"optimizer": "sgd", "early_stop_on": "loss"},
    "now": {},
    "full": {"fast_path": False},
    "rows5": {"prefixes.count": 5},
    "stop005": {"early_stop_loss": 0.05},
    "patience1": {"early_stop_patience": 1},
    "noside": {"side_steps": 0},
}


def run(setting: dict[str, Any], args: argparse.Namespace) -> list[tuple[float, int, int, int]]:
    """(seconds, steps, answered at, side steps) of each edit, from a freshly loaded
    model."""
    editor = fresh_editor(args, {**HEADLINE, **args.overrides, **setting})
    records = load_zsre(args.data_dir, limit=args.edits)
    results = editor.edit_many([(r.prompt, r.target) for r in records], progress=True)
    # an edit never answered within max_steps counts as answered at its last step
    return [(r.seconds, r.steps, r.answered_at or r.steps, r.side_steps) for r in results]


def main() -> None:
    parser = editing_parser(__doc__, edits=50)
    add_settings(parser, SETTINGS, default="before,now")
    args = parser.parse_args()
    names = chosen_settings(parser, args, SETTINGS)
    args.overrides = overrides(args)
    torch.manual_seed(0)
    rows = {}
    for name in names:
        seconds, steps, answered, side = zip(*run(SETTINGS[name], args))
        rows[name] = (
            statistics.median(seconds),
            statistics.median(s / n for s, n in zip(seconds, steps)),
            statistics.mean(steps),
            statistics.median(answered),
            statistics.mean(side),
        )
    print(
        f"{args.edits} ZsRE edits on {args.model} ({args.device}), torch threads "
        f"{torch.get_num_threads()}, common settings {HEADLINE | args.overrides}"
    )
    header = (
        "setting",
        "median s/edit",
        "median s/step",
        "steps/edit",
        "answered at",
        "side/edit",
        "ratio",
    )
    print(f"{header[0]:<10}" + "".join(f"{h:>15}" for h in header[1:6]) + f"{header[6]:>8}")
    first = rows[names[0]][0]
    for name, (s_edit, s_step, steps, at, side) in rows.items():
        print(
            f"{name:<10}{s_edit:>15.3f}{s_step:>15.4f}{steps:>15.1f}{at:>15.1f}{side:>15.1f}"
            f"{first / s_edit:>7.2f}x"
        )


if __name__ == "__main__":
    main()
