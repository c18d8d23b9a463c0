# Experiment: What does a subject key cost, and does the two-layer key equal the one a forward up to
#   the edited layer gives?
# Decided: The same tensors at 0.23 -> 0.023 s per key; keys run two layers since 52f5094 (the
#   script ran at 52f5094~1 and 52f5094)
# Ran at: 2e1bc7e, as docs/results/subject-gate/key_cost.py. Output:
#   docs/notebook/results/subject-gate/
"""Seconds per subject key on the bundled model (20 CounterFact edits, one thread), and,
from 52f5094 on, whether the two-layer key equals the one a forward up to the edited
layer hands up (the path before 52f5094). Run at 52f5094~1 and at 52f5094:

    OMP_NUM_THREADS=1 python docs/results/subject-gate/key_cost.py
"""

import time

import torch

from wise_edit import WiseConfig, models
from wise_edit.core.draft import EditRequest
from wise_edit.data import load_dataset
from wise_edit.wise.editor import WiseEditor

torch.set_num_threads(1)
model, tok = models.load("smollm2-135m", device="cpu")
editor = WiseEditor(model, tok, WiseConfig.for_model(model), irrelevant_prompts=["Hello."] * 8)
print("edited layer", editor.layer_index, "subject depth", editor._subject_depth())
records = load_dataset("counterfact", "../shared/data", limit=20)
requests = [EditRequest(r.prompt, r.target, r.subject) for r in records]
editor._subject_key(requests[0])  # the centre, once
started = time.perf_counter()
for request in requests:
    editor._subject_key(request)
print(f"seconds per key: {(time.perf_counter() - started) / len(requests):.3f}")
if len(editor._lower_states(["x"])) == 3:  # 52f5094 on
    for request in requests[:5]:
        states, _, _ = editor._lower_states([request.prompt])
        editor._prompt_batch_acts([request.prompt])  # runs to the edited layer; the hook hands up
        print(
            "same states as the forward to the edited layer:",
            torch.equal(states, editor.layer.routing.lower),
        )
