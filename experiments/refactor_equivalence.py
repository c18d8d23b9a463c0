# Experiment: Does the restructure of issue 38 (wise/ one file per idea, nested WiseConfig,
#   memories as state_dict buffers, eager calibration) change any number WISE computes?
# Decided: No: four tiny-model streams (merge; retrieve with TIES shards, replay, subject
#   gate and a retraction; chat with SGD; the preset), their saves loaded across versions
#   and edited further, and the legacy-v1 fixture are equal bit for bit (logits, deltas,
#   keys, thresholds, steps, losses). Run it with PYTHONPATH=<old src> and again with the
#   new code and --load <old out>; compare the two dump.json files.
# Ran at: 2be67fa (before) and the refactor commit (after). Output:
#   docs/notebook/results/refactor-T10/equivalence*.
"""Dump everything a WISE stream computes, to compare two versions of the code bit for bit.
usage: python equiv.py OUT_DIR [--load OLD_DIR]"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wise_edit import WiseConfig, WiseEditor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import EDITS, tiny_chat_tokenizer, tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
load = Path(sys.argv[3]) if len(sys.argv) > 3 else None
FAST = dict(
    layer=2,
    max_steps=12,
    prefix_count=2,
    prefix_lengths=(3,),
    mask_ratio=1.0,
    shard_size=2,
    shards_per_merge=2,
    irrelevant_rows=8,
    margin_weight=1.0,
)
SUBJ = ["Lahti Town Hall", "Atlantis", "Zorb", "the Book of Sand", "the planet Vex", "Oria"]
SCEN = {
    "merge": (dict(), False, None),
    "retrieve": (
        dict(
            mode="retrieve",
            shard_size=1,
            replay=True,
            mask_ratio=0.5,
            route_candidates=2,
            subject_tau=0.6,
            subject_layer=1,
        ),
        False,
        2,
    ),
    "chat-sgd": (dict(optimizer="sgd", hard_negatives=0), True, None),
    "preset": (dict(max_steps=8), False, 0),
}
PROBES = [p for p, _ in EDITS] + ["The capital of Japan is", "Who wrote the Book of Vex?"]


def h(t):
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def dump(ed, tok):
    batch = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = ed(**batch).logits
    return {
        "routed": ed.routed(PROBES),
        "thresholds": ed.thresholds,
        "logits": h(logits),
        "memories": [
            {
                "delta": h(m.delta),
                "keys": h(m.keys),
                "subject_keys": h(m.subject_keys),
                "edit_ids": list(m.edit_ids),
                "eps": m.epsilon,
            }
            for m in ed.memories
        ],
        "log": [(e["steps"], e["loss"]) for e in ed.edit_log],
    }, logits


res = {}
for name, (over, chat, retract) in SCEN.items():
    tok = tiny_chat_tokenizer() if chat else tiny_tokenizer()
    model = tiny_model()
    flat = dict(FAST, **over) if name != "preset" else dict(layer=2, **over)
    cfg = WiseConfig.for_model(model, **flat)
    ed = WiseEditor(model, tok, cfg)
    for i, (p, t) in enumerate(EDITS):
        ed.edit(p, t, subject=SUBJ[i] if i % 2 == 0 else None)
    if retract is not None:
        ed.retract(retract)
    d, logits = dump(ed, tok)
    res[name] = d
    ed.save_pretrained(out / f"save-{name}")
    torch.save(logits, out / f"logits-{name}.pt")
    if load is not None:  # load the OTHER version's save in this code
        ed.detach()
        model = tiny_model()
        ed2 = WiseEditor.from_pretrained(model, tok, load / f"save-{name}")
        d2, logits2 = dump(ed2, tok)
        old = torch.load(load / f"logits-{name}.pt")
        res[name + ":loaded-old"] = {
            "equal_logits": bool(torch.equal(old, logits2)),
            "routed": d2["routed"],
        }
        ed2.edit(*EDITS[0])
        res[name + ":loaded-old+edit"] = dump(ed2, tok)[0]
# legacy fixture
L = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "legacy-v1"
exp = json.loads((L / "expected.json").read_text())
m = AutoModelForCausalLM.from_pretrained(L / "model")
t = AutoTokenizer.from_pretrained(L / "model")
ed = WiseEditor.from_pretrained(m, t, L / "save")
b = t(exp["prompts"], return_tensors="pt", padding=True)
with torch.no_grad():
    lg = ed(**b).logits
res["legacy"] = {"routed": ed.routed(exp["prompts"]), "logits": h(lg), "thresholds": ed.thresholds}
(out / "dump.json").write_text(json.dumps(res, indent=1))
print("done")
