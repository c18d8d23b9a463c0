# Experiment: Why does an edit of gemma3-270m with the defaults take all 70 steps?
# Decided: the answer is right within 7-12 steps; the rest go to the routing margins, which
#   never fall under the answer stop's bound: each full step raises the unrelated prompts'
#   scores again and the side steps push them back down. Routing at inference still
#   separates (unrelated <= 0.6 units against thresholds ~1 unit), so the steps are
#   spent on a margin the stop asks for, not on the edit. Not changed yet: see
#   docs/notebook/RESULTS.md "gemma3-270m: where an edit's 70 steps go".
# Ran at: 265a194
"""Each margin-loss term (Eq. 5) at every loss the fit computes, for the first ZsRE edits
of a model with the defaults (forwards and side updates alike, in order).

    python experiments/gemma_margin_trace.py --model gemma3-270m --edits 2

Columns, in units of the editor's score scale: the mean excess of the unrelated prompts
over alpha, of beta over the edit rows, of gamma over the gaps; the highest unrelated
score; the lowest edit-row score.
"""

from __future__ import annotations

import argparse
import time

import torch.nn.functional as F

import wise_edit.wise.draft as draft
from wise_edit import WiseConfig, WiseEditor, models
from wise_edit.data import default_data_dir, load_zsre, load_zsre_irrelevant, load_zsre_same_form


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--edits", type=int, default=2)
    parser.add_argument("--every", type=int, default=5, help="print every N-th loss")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    args = parser.parse_args()
    terms: list[tuple[float, ...]] = []
    margin_loss = draft.margin_loss

    def traced(edit, unrelated, alpha, beta, gamma):  # noqa: ANN001, ANN202
        gap = edit[:, None] - unrelated[None, :]
        terms.append(
            (
                F.relu(unrelated - alpha).mean().item(),
                F.relu(beta - edit).mean().item(),
                F.relu(gamma - gap).mean().item(),
                unrelated.max().item(),
                edit.min().item(),
            )
        )
        return margin_loss(edit, unrelated, alpha, beta, gamma)

    draft.margin_loss = traced  # a diagnostic: it wraps the loss and changes nothing
    model, tokenizer = models.load(args.model, device="cpu")
    pool = load_zsre_irrelevant(args.data_dir) + load_zsre_same_form(args.data_dir)
    editor = WiseEditor(model, tokenizer, WiseConfig.for_model(model), irrelevant_prompts=pool)
    routing = editor.config.routing
    print(f"alpha {routing.alpha}, beta {routing.beta}, gamma {routing.gamma} (score units)")
    for record in load_zsre(args.data_dir, limit=args.edits):
        terms.clear()
        started = time.perf_counter()
        result = editor.edit(record.prompt, record.target)
        print(
            f"\nedit {result.index}: {result.steps} steps, {result.side_steps} side updates, "
            f"answered at {result.answered_at}, loss {result.loss:.3f} (LM {result.lm_loss:.3f}), "
            f"{time.perf_counter() - started:.1f} s"
        )
        print("loss  unrel>alpha  edit<beta  gap<gamma  max unrel  min edit")
        for i, row in enumerate(terms):
            if i % args.every == 0 or i == len(terms) - 1:
                print(f"{i:>4}" + "".join(f"{v:>11.3f}" for v in row))


if __name__ == "__main__":
    main()
