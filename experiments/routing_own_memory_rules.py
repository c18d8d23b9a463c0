# Experiment: Which memory should answer when several clear their thresholds (six routing rules on
#   saved Retrieve runs)?
# Decided: Rule F, the paper's top score except that a prompt repeating an edit's own (key cosine >=
#   0.99) goes to that edit's memory, is the editor's rule since e04ad99
# Ran at: 35b832a, as docs/results/routing-own-memory/rules.py. Output:
#   docs/notebook/results/routing-own-memory/
"""Which memory should answer when several clear their thresholds? Routing rules compared
on a saved WISE-Retrieve run (issue 11; docs/RESULTS.md, "Which memory answers").

Every rule sees the same candidates as the editor (the memories of the 4 nearest edit
keys within the key radius) and the same exact scores; they differ only in the winner:

A  the top score, then its threshold (the paper's Algorithm 2)
B  the top score / threshold, then > 1
C  among candidates clearing their thresholds, the nearest key
D  among candidates clearing their thresholds, the newest memory
E  A decides whether a memory answers, C which one
F  A, except that a candidate with a key at cosine >= tau (the prompt repeats that
   edit's) that clears its threshold answers

    python rules.py SAVE DATA T      (200 probed records, seed 0, as threshold_whatif.py)
"""

import random
import sys

import torch

from wise_edit import WiseEditor, models
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.wise.router import candidate_memories, memory_nearness

NONE = float("-inf")


def main() -> None:
    save, data, edits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    editor = WiseEditor.from_pretrained(model, tokenizer, save)
    loaded = load_dataset(data, str(default_data_dir()), limit=edits + 100)
    records = loaded[:edits]
    picked = sorted(random.Random(0).sample(range(edits), min(200, edits)))
    owner = torch.tensor([editor.memory_holding(i) for i in range(edits)])
    thresholds = torch.tensor(editor.thresholds)
    keys, key_owner = editor.edit_keys()
    memories, radius = len(editor.memories), editor.key_radius or 0.0
    groups = {
        "edit": [records[i].prompt for i in picked],
        "para": [records[i].rephrase for i in picked],
        "loc": [records[i].loc for i in picked],
        "same": [r.prompt for r in loaded[edits:]],
    }
    want = {"edit": owner[picked], "para": owner[picked]}
    for name, prompts in groups.items():
        scores = torch.cat(
            [editor.activation_scores(prompts[i : i + 32]) for i in range(0, len(prompts), 32)],
            dim=1,
        )  # (M, B)
        queries = editor.prompt_keys(prompts)
        near = memory_nearness(queries, keys, key_owner, memories)
        candidates = candidate_memories(queries, keys, key_owner, 4, radius)[0]
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for row in range(scores.shape[1]):
            for memory in candidates[row].unique().tolist():
                if memory >= 0:
                    allowed[memory, row] = True
        clearing = allowed & (scores > thresholds[:, None])
        rules = {}
        best, top = scores.masked_fill(~allowed, NONE).max(dim=0)
        rules["A raw score"] = torch.where(best > thresholds[top], top, -1)
        ratio = (scores / thresholds[:, None]).masked_fill(~allowed, NONE)
        best, top = ratio.max(dim=0)
        rules["B score/threshold"] = torch.where(best > 1, top, -1)
        nearest, closest = near.masked_fill(~clearing, NONE).max(dim=0)
        rules["C nearest key among passing"] = torch.where(nearest > NONE, closest, -1)
        newest = torch.arange(memories, dtype=torch.float)[:, None].expand_as(scores)
        best, top = newest.masked_fill(~clearing, -1.0).max(dim=0)
        rules["D newest passing"] = torch.where(best >= 0, top, -1)
        routed = rules["A raw score"] >= 0
        rules["E A routes, nearest passing answers"] = torch.where(routed, closest, -1)
        for tau in (0.98, 0.99, 0.995):
            answer = torch.where(nearest >= tau, closest, rules["A raw score"])
            rules[f"F exact>={tau} else A"] = torch.where(routed, answer, -1)
        wanted = want.get(name)
        cells = []
        for rule, choice in rules.items():
            right = (choice == wanted) if wanted is not None else (choice < 0)
            cells.append(f"{rule}: {right.float().mean():.3f}")
        print(f"{name} ({len(prompts)}): " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
