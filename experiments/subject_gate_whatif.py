# Experiment: What if a memory could answer only prompts naming one of its edits' subjects, keyed at
#   the edited layer?
# Decided: At layer 25 the gate trades locality for paraphrases about one for one; not built there
#   (see subject_gate_whatif_layers.py)
# Ran at: c8da663, as docs/results/subject-gate/whatif.py. Output:
#   docs/notebook/results/subject-gate/
"""What if a side memory could answer only prompts that name one of its edits' subjects?
A what-if on a saved WISE-Retrieve run (issue 11, CounterFact locality): routing only.

Each edit gets a subject key, the value-matrix input at its subject's last token in its
own prompt. A probe's subject match to an edit is the largest cosine between any of the
probe's routed tokens and that key. The editor routes as it does (its rule, index and
thresholds); the gate then sends a prompt back to the unedited model when the memory it
chose holds no edit whose subject match reaches tau.

    python whatif.py SAVE DATA T      (every record; taus printed in one table)
"""

import sys

import torch

from wise_edit import WiseEditor, models
from wise_edit.core.rows import encode_prompts
from wise_edit.data import default_data_dir, load_dataset

KEY = sys.argv[4] if len(sys.argv) > 4 else "last"  # last subject token, or "mean" of them
TAUS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


def token_acts(editor, prompts, batch=32):
    """Per prompt: its routed tokens' unit-norm value-matrix inputs (t, I), and ids."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        acts, mask = editor._prompt_batch_acts(chunk)
        ids, _ = encode_prompts(editor.format, chunk)
        for a, m, row in zip(acts, mask, ids):
            keep = m.bool().cpu()
            out.append(
                (
                    torch.nn.functional.normalize(a.float().cpu()[keep], dim=-1),
                    row[keep.to(row.device)].tolist(),
                )
            )
    return out


def find(seq, sub):
    for start in range(len(seq) - len(sub), -1, -1):
        if seq[start : start + len(sub)] == sub:
            return start + len(sub) - 1
    return None


def subject_span(tokenizer, ids, subject):
    for variant in (" " + subject, subject, " " + subject.strip(), subject.strip()):
        sub = tokenizer(variant, add_special_tokens=False)["input_ids"]
        at = find(ids, sub)
        if at is not None:
            return at - len(sub) + 1, at
    return None


def probe_groups(loaded, edits, owner):
    """name -> (prompts, the memory each should reach, or None: no memory). "same" are
    the prompts of the records after the edited ones (same form, unedited subjects)."""
    records = loaded[:edits]
    return {
        "edit": ([r.prompt for r in records], owner),
        "para": (
            [r.rephrase for r in records if r.rephrase],
            [o for r, o in zip(records, owner) if r.rephrase],
        ),
        "loc": ([r.loc for r in records if r.loc], None),
        "same": ([r.prompt for r in loaded[edits:]], None),
    }


def gated_cells(choice, match, member, want):
    """One table row: per tau, the share routed right once the gate has sent back every
    prompt whose chosen memory holds no edit its ``match`` (B, E) reaches tau in."""
    cells = []
    for tau in TAUS:
        right = 0
        for b, c in enumerate(choice):
            gated = c
            if c >= 0 and not bool((match[b][member[c]] >= tau).any()):
                gated = -1
            right += (gated == want[b]) if want is not None else (gated < 0)
        cells.append(f"{right / len(choice):.3f}")
    return " | ".join(cells)


def main():
    save, data, edits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    editor = WiseEditor.from_pretrained(model, tokenizer, save)
    loaded = load_dataset(data, str(default_data_dir()), limit=edits + 100)
    records = loaded[:edits]
    owner = [editor.memory_holding(i) for i in range(edits)]
    with torch.no_grad():
        edit_acts = token_acts(editor, [r.prompt for r in records])
        keys, found = [], 0
        for (acts, ids), r in zip(edit_acts, records):
            span = subject_span(tokenizer, ids, r.subject or "") if r.subject else None
            found += span is not None
            if span is None:
                keys.append(acts.mean(0))
            elif KEY == "last":
                keys.append(acts[span[1]])
            else:
                keys.append(
                    torch.nn.functional.normalize(acts[span[0] : span[1] + 1].mean(0), dim=0)
                )
        keys = torch.stack(keys)  # (E, I) unit rows (the mean is not unit; rare)
        print(f"subject found in {found} of {edits} edit prompts")
        memories = len(editor.memories)
        member = torch.zeros(memories, edits, dtype=torch.bool)
        for i, m in enumerate(owner):
            member[m, i] = True
        groups = probe_groups(loaded, edits, owner)
        print("group (n) | " + " | ".join(f"tau {t}" for t in TAUS))
        for name, (prompts, want) in groups.items():
            choice = []
            for i in range(0, len(prompts), 32):
                choice += editor.routing_detail(prompts[i : i + 32])[0]
            acts = token_acts(editor, prompts)
            match = torch.stack([(a @ keys.T).max(0).values for a, _ in acts])  # (B, E)
            print(f"{name} ({len(prompts)}) | " + gated_cells(choice, match, member, want))
        # how well the subject match alone separates: own edit's match on paraphrases vs
        # the best match among the chosen memory's edits for locality probes
        print("done")


if __name__ == "__main__":
    main()
