# Experiment: Which edit prompts does the router send to another memory than their own, and why?
# Decided: Repeated and same-template ZsRE questions, where the top score picks a neighbour's
#   memory; this led to the rules compared and the repeated-prompt rule (e04ad99)
# Ran at: 35b832a, as docs/results/routing-own-memory/misrouted.py. Output:
#   docs/notebook/results/routing-own-memory/
"""Edit prompts of a saved run that the router sends to another memory than their own,
with that memory's edits (what they were taken for):

    python misrouted.py RUN DATA T
"""

import sys

from wise_edit import WiseEditor, models
from wise_edit.data import default_data_dir, load_dataset


def main() -> None:
    run, data, edits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    editor = WiseEditor.from_pretrained(model, tokenizer, f"{run}/checkpoint/editor")
    records = load_dataset(data, str(default_data_dir()), limit=edits)
    for i, memory in enumerate(editor.routed([r.prompt for r in records])):
        own = editor.memory_holding(i)
        if memory == own:
            continue
        print(
            f"edit {i} (memory {own}) {records[i].prompt!r} -> {records[i].target!r}; "
            f"routed to {memory}:"
        )
        for j in editor.memories[memory].edit_ids if memory >= 0 else []:
            print(f"     {j}: {records[j].prompt!r} -> {records[j].target!r}")


if __name__ == "__main__":
    main()
