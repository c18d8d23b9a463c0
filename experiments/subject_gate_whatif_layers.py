# Experiment: Does the subject gate keyed at a lower layer keep locality probes off the memories
#   without losing paraphrases?
# Decided: Yes at layer 2 (CounterFact T = 1000 locality .70 -> .93, one paraphrase in 1000 lost);
#   built as the subject gate (`subject_tau` 0.6, `subject_layer` 2) in e9501a8
# Ran at: c8da663, as docs/results/subject-gate/whatif_layers.py. Output:
#   docs/notebook/results/subject-gate/
"""The subject gate of whatif.py with subject keys taken from lower layers (issue 11,
CounterFact locality; routing only, on a saved WISE-Retrieve run).

whatif.py keyed each edit by the value-matrix input at its subject's last token, at the
edited layer (25 of 30 on SmolLM2), where that token already carries its sentence, and
the gate bought locality with paraphrases one for one. Here the key is the residual
stream after layer L at the subject's last token, centred by the mean over neutral text's
tokens at that layer (the residual stream has a few large dimensions that every token
shares), for several L. A probe's match to an edit is the largest cosine between any of
its routed tokens and the edit's key; the gate sends a prompt back to the unedited model
when the memory it was routed to holds no edit matched at tau or above.

    python whatif_layers.py SAVE DATA T [LAYER ...]
"""

import sys

import torch
from whatif import TAUS, gated_cells, probe_groups, subject_span

from wise_edit import WiseEditor, models
from wise_edit.core.rows import encode_prompts
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.neutral import NEUTRAL_PROMPTS


def hidden_tokens(editor, prompts, layers, batch=32):
    """Per layer, per prompt: the routed tokens' residual-stream states (t, H); and ids."""
    per_layer = {layer: [] for layer in layers}
    ids_out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        ids, mask = encode_prompts(editor.format, chunk)
        routed = editor._routing_mask(ids, mask)
        out = editor.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for b in range(len(chunk)):
            keep = routed[b].bool()
            ids_out.append(ids[b][keep].tolist())
            for layer in layers:
                per_layer[layer].append(out.hidden_states[layer][b][keep].float())
    return per_layer, ids_out


def main():
    save, data, edits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layers = [int(x) for x in sys.argv[4:]] or [2, 5, 8, 12, 16, 20, 25]
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    editor = WiseEditor.from_pretrained(model, tokenizer, save)
    loaded = load_dataset(data, str(default_data_dir()), limit=edits + 100)
    records = loaded[:edits]
    owner = [editor.memory_holding(i) for i in range(edits)]
    member = torch.zeros(len(editor.memories), edits, dtype=torch.bool)
    for i, m in enumerate(owner):
        member[m, i] = True
    groups = probe_groups(loaded, edits, owner)
    with torch.no_grad():
        neutral, _ = hidden_tokens(editor, list(NEUTRAL_PROMPTS), layers)
        centre = {layer: torch.cat(neutral[layer]).mean(0) for layer in layers}

        def unit(layer, states):
            return torch.nn.functional.normalize(states - centre[layer], dim=-1)

        edit_states, edit_ids = hidden_tokens(editor, groups["edit"][0], layers)
        spans = [subject_span(tokenizer, ids, r.subject or "") for ids, r in zip(edit_ids, records)]
        print(f"subject found in {sum(s is not None for s in spans)} of {edits} edit prompts")
        keys = {}
        for layer in layers:
            rows = [
                unit(layer, states[span[1]] if span else states.mean(0))
                for states, span in zip(edit_states[layer], spans)
            ]
            keys[layer] = torch.stack(rows)  # (E, H)
        probes = {}
        for name, (prompts, _) in groups.items():
            choice = []
            for i in range(0, len(prompts), 32):
                choice += editor.routing_detail(prompts[i : i + 32])[0]
            states, _ = hidden_tokens(editor, prompts, layers)
            probes[name] = (choice, states)
    for layer in layers:
        print(f"\nlayer {layer}\ngroup (n) | " + " | ".join(f"tau {t}" for t in TAUS))
        for name, (prompts, want) in groups.items():
            choice, states = probes[name]
            match = torch.stack(
                [(unit(layer, s) @ keys[layer].T).max(0).values for s in states[layer]]
            )  # (B, E)
            print(f"{name} ({len(prompts)}) | " + gated_cells(choice, match, member, want))


if __name__ == "__main__":
    main()
