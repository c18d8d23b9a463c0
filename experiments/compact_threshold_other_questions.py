"""Question: at which threshold ratio do one-edit compact memories (`memory.rank` 8) start
taking questions they were not trained on? Routes 100 other ZsRE questions (records
600-699) and their paraphrases through the saved runs c1-mid40 and c1-last30
(docs/notebook/results/compact-memories), every memory's threshold rescaled from 0.88 to
the ratio (thresholds act at inference only, so a save rescaled is the run at that ratio).

Decision: 0.8 (0.5% -> 1.5% and 2.5% -> 4.0% of the 200 routed to some memory, against
3.5% and 4.5% at 0.7), with the answers rescored by compact_threshold_ratio.sh. Ran at
2f5f124.
"""

import torch

from wise_edit import load_editor
from wise_edit.data import load_zsre
from wise_edit.models import load

model, tok = load("smollm2-135m")
others = load_zsre("/work/shared/data")[600:700]
probe = [r.prompt for r in others] + [r.rephrase for r in others if r.rephrase]
for run in ("c1-mid40", "c1-last30"):
    ed = load_editor(model, tok, f"{run}/checkpoint/editor")
    base = [m._epsilon for m in ed.memories]
    for ratio in (0.88, 0.8, 0.7, 0.6):
        for m, e in zip(ed.memories, base):
            m._epsilon = e * ratio / 0.88
        r = torch.tensor(ed.routed(probe))
        share = (r >= 0).float().mean()
        print(run, ratio, f"other ZsRE questions routed {share:.3f} of {len(probe)}", flush=True)
    ed.detach()
