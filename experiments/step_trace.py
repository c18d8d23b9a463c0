# Experiment: Where do an edit's steps go (per step: target NLL, greedy hit, each term of the margin
#   loss)?
# Decided: The last steps only push the hardest unrelated prompt under alpha: the answer stop's
#   `early_stop_loss` became 0.2, and side steps (margin-only updates once the answer's NLL settled)
#   became the default
# Ran at: 9412e5c, as benchmarks/step_trace.py. Output: docs/notebook/results/step-trace/,
#   docs/notebook/results/step-trace-side16/
"""Where an edit's steps go: per step, the target NLL, whether greedy decoding already
says the target, and each term of the margin loss (Eq. 5), for a few ZsRE edits.

    python benchmarks/step_trace.py --edits 5 --every 3
    python benchmarks/step_trace.py --edits 8 --every 1 --set side_steps=16

With side steps (``side_steps``), their updates on the margins alone are listed as
"side" rows between the forwards (numbered steps); --every thins the forwards only.

Scores are in units of the editor's score scale, like alpha/beta/gamma. A diagnostic: it
wraps the editor's loss functions from outside to see their inputs, and changes nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from common import HEADLINE, editing_parser, fresh_editor, overrides

import wise_edit.core.editor as core_editor
import wise_edit.wise.editor as wise_editor
from wise_edit.core.fit import fit
from wise_edit.data import load_zsre


def main() -> None:
    parser = editing_parser(__doc__, edits=5)
    parser.add_argument("--every", type=int, default=3, help="print every N-th step")
    args = parser.parse_args()
    fields = overrides(args)
    rows: list[dict[str, float | str]] = []  # one per forward or side update
    terms: list[dict[str, float]] = []  # the margin terms of the latest loss

    def traced_margin(edit, unrelated, alpha, beta, gamma):  # Eq. 5, term by term
        gap = edit[:, None] - unrelated[None, :]
        parts = {
            "unrel>alpha": F.relu(unrelated - alpha).mean(),
            "edit<beta": F.relu(beta - edit).mean(),
            "gap<gamma": F.relu(gamma - gap).mean(),
        }
        terms.append(
            {k: v.item() for k, v in parts.items()}
            | {"max unrel": unrelated.max().item(), "min edit": edit.min().item()}
        )
        return sum(parts.values())

    def traced_fit(loss_fn, update, side_loss_fn=None, **kwargs):
        def step():
            out = loss_fn()
            rows.append({"lm": out.lm.item(), "answered": float(bool(out.answered))} | terms[-1])
            return out

        def side():
            out = side_loss_fn()
            rows.append({"kind": "side"} | terms[-1])
            return out

        return fit(step, update, side_loss_fn=side_loss_fn and side, **kwargs)

    wise_editor.margin_loss = traced_margin
    core_editor.fit = traced_fit

    editor = fresh_editor(args, {**HEADLINE, **fields})
    config = editor.config
    print(
        f"alpha {config.alpha}, beta {config.beta}, gamma {config.gamma} (score units); "
        f"margin weight {config.margin_weight}, stop bound {config.early_stop_loss}"
    )
    for record in load_zsre(args.data_dir, limit=args.edits):
        rows.clear()
        result = editor.edit(record.prompt, record.target)
        print(
            f"\nedit {result.index}: {result.steps} steps, {result.side_steps} side updates, "
            f"answered at {result.answered_at}"
        )
        print("step      lm  answered  unrel>alpha  edit<beta  gap<gamma  max unrel  min edit")
        forwards = sum("lm" in r for r in rows)
        n = 0
        for row in rows:
            if "lm" in row:
                n += 1
                if n % args.every and n != forwards:
                    continue
                head = f"{n:>4}{row['lm']:>8.3f}{int(row['answered']):>10}"
            else:
                head = f"{'side':>22}"
            print(
                f"{head}{row['unrel>alpha']:>13.3f}{row['edit<beta']:>11.3f}"
                f"{row['gap<gamma']:>11.3f}{row['max unrel']:>11.2f}{row['min edit']:>10.2f}"
            )


if __name__ == "__main__":
    main()
