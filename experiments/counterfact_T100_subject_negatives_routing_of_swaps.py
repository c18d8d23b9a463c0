# Experiment: Do memories trained on subject swaps stay off their wording about other subjects?
# Decided: Only for the subjects trained on (.185 -> .055 reach a memory), not others (.17 -> .175)
#   nor locality probes; `subject_negatives` stays 0
# Ran at: b49d534, as docs/results/counterfact-T100-subject-negatives/routing_of_swaps.py. Output:
#   docs/notebook/results/counterfact-T100-subject-negatives/
"""Share of the first 100 CounterFact prompts, each rewritten about 2 built-in subjects or 2
subjects of held-out records (8000-8999), and of their locality probes, that reach a side
memory of a saved CounterFact T = 100 run (runs/<name>/checkpoint/editor)."""

import sys

import torch

from wise_edit import load_editor, models
from wise_edit.data import load_dataset
from wise_edit.neutral import NEUTRAL_SUBJECTS, swap_subject

torch.manual_seed(0)
model, tok = models.load("smollm2-135m", device="cpu")
recs = load_dataset("counterfact", "../shared/data", 100)
tail = load_dataset("counterfact", "../shared/data", 9000)[8000:]
for run in sys.argv[1:]:
    ed = load_editor(model, tok, f"runs/{run}/checkpoint/editor")
    g = torch.Generator().manual_seed(1)
    groups = {"edit": [], "builtin swap": [], "cf-subject swap": [], "locality": []}
    for r in recs:
        groups["edit"].append(r.prompt)
        o = [NEUTRAL_SUBJECTS[i] for i in torch.randperm(len(NEUTRAL_SUBJECTS), generator=g)[:2]]
        groups["builtin swap"] += swap_subject(r.prompt, r.subject, o)
        o = [tail[i].subject for i in torch.randperm(len(tail), generator=g)[:2]]
        groups["cf-subject swap"] += swap_subject(r.prompt, r.subject, o)
        groups["locality"].append(r.loc)
    out = {k: sum(c >= 0 for c in ed.routed(v)) / len(v) for k, v in groups.items()}
    print(run, {k: round(v, 3) for k, v in out.items()}, flush=True)
    ed.detach()
