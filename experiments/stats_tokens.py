# Experiment: How much do ROME's and MEMIT's updates depend on the amount of text C = E[k k^T]
#   is measured on?
# Decided: see docs/notebook/RESULTS.md, "Key statistics against the amount of text"
# Ran at: the commit that added it, as experiments/stats_tokens.py. Output:
#   docs/notebook/results/stats-tokens/
"""C of layer 4's value matrix (ROME's layer on SmolLM2) measured on 10K, 30K and 100K (the
editors' default) tokens of the Hallucination passages and on all of them (~141K), and what
each gives the update. ROME's update is
(v* - W k) u^T / (u . k) with u = C^-1 k (ROME Eq. 2), so C enters only through the
direction u; MEMIT's for one edit, R k^T (lambda C + k k^T)^-1, has the same direction
(Sherman-Morrison). For the subject keys of 40 ZsRE edits (the subject's last token, raw
prompts), the cosine of u against the 100K-token u and the relative difference of the
update's right factor u / (u . k), which fixes ΔW given v*, both against all the text.

    OMP_NUM_THREADS=1 python experiments/stats_tokens.py --records 40
"""

from __future__ import annotations

import argparse
import statistics

import torch

from wise_edit import models
from wise_edit.baselines.layer_stats import load_or_measure
from wise_edit.core.fastpath import capture
from wise_edit.data import default_data_dir, load_zsre
from wise_edit.wise.router import subject_end

LAYER = 4
BUDGETS = (10_000, 30_000, 100_000, 1_000_000)  # the last: all the text at hand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40)
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    path = f"model.layers.{LAYER}.mlp.down_proj"
    module = model.model.layers[LAYER].mlp.down_proj
    corpus = str(default_data_dir())
    stats = {n: load_or_measure(model, tokenizer, {path: module}, corpus, n)[path] for n in BUDGETS}
    moments = {n: s.moment for n, s in stats.items()}
    keys = []
    for record in load_zsre(corpus, limit=args.records):
        ids = tokenizer(record.prompt)["input_ids"]
        at = subject_end(tokenizer, ids, record.subject) if record.subject else None
        at = len(ids) - 1 if at is None else at
        batch = torch.tensor([ids])
        acts = capture(
            model.model, model.model.layers, LAYER, module, batch, torch.ones_like(batch)
        ).acts
        keys.append(acts[0, at].double())
    reference = moments[BUDGETS[-1]]
    print(
        f"layer {LAYER}, {len(keys)} ZsRE subject keys; "
        f"against C of all {stats[BUDGETS[-1]].tokens} tokens"
    )
    print(
        "tokens  ||C - C_ref|| / ||C_ref||  cos(u, u_ref) median / min"
        "  right factor rel. diff median / max"
    )
    for n in BUDGETS:
        c = moments[n]
        cosines, diffs = [], []
        for k in keys:
            u, u_ref = torch.linalg.solve(c, k), torch.linalg.solve(reference, k)
            cosines.append(float(u @ u_ref / (u.norm() * u_ref.norm())))
            right, right_ref = u / (u @ k), u_ref / (u_ref @ k)
            diffs.append(float((right - right_ref).norm() / right_ref.norm()))
        rel = float((c - reference).norm() / reference.norm())
        print(
            f"{stats[n].tokens:>6}  {rel:>24.4f}  "
            f"{statistics.median(cosines):>10.4f} / {min(cosines):.4f}"
            f"  {statistics.median(diffs):>14.4f} / {max(diffs):.4f}"
        )


if __name__ == "__main__":
    main()
