# Experiment: What share of edit prompts and paraphrases of runs finished before 693ad65 reach the
#   memory that holds their edit, not just some memory?
# Decided: Fewer than reported (ZsRE T = 1000: 8% of edit prompts, 23% of paraphrases miss their own
#   memory); the bench reports own-memory routing since 693ad65
# Ran at: 35b832a, as docs/results/routing-own-memory/own_routing.py. Output:
#   docs/notebook/results/routing-own-memory/
"""Share of edit prompts and paraphrases routed to the memory holding their edit, of
saved bench runs, by `wise_edit.bench.routing_scores` over all T records (what `bench`
reports since 693ad65), for runs that finished before it did:

    python own_routing.py RUN:DATA:T [RUN:DATA:T ...]
"""

import json
import sys

from wise_edit import WiseEditor, models
from wise_edit.bench import SAME_FORM_PROBES, routing_scores
from wise_edit.data import default_data_dir, load_dataset


def main() -> None:
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    for spec in sys.argv[1:]:
        run, data, edits = spec.split(":")
        editor = WiseEditor.from_pretrained(model, tokenizer, f"{run}/checkpoint/editor")
        loaded = load_dataset(data, str(default_data_dir()), limit=int(edits) + SAME_FORM_PROBES)
        found = routing_scores(
            editor, loaded[: int(edits)], [r.prompt for r in loaded[int(edits) :]]
        )
        shares = {k: v for k, v in found["summary"].items() if k != "thresholds"}
        rounded = {k: {g: round(v, 3) for g, v in d.items()} for k, d in shares.items()}
        print(run, json.dumps(rounded), flush=True)
        editor.detach()


if __name__ == "__main__":
    main()
