# Experiment: Does a token-by-token key separate paraphrases from locality probes better than the
#   mean key?
# Decided: No, worse (at 0.7: paraphrases .47, locality .85); not adopted, the key radius uses the
#   mean key
# Ran at: 94875c4, as docs/results/counterfact-T100-key-radius/token_match.py. Output:
#   docs/notebook/results/counterfact-T100-key-radius/
"""A finer key than the mean, tried before the key radius and not adopted: match a
prompt to an edit token by token (for each token of the edit prompt, its best cosine
among the prompt's tokens, averaged), so that a paraphrase (same subject, other words)
should come nearer than a locality probe (same words, other subject). Prints the share
of each probe group routed right when memories beyond a token-match radius are masked,
as `benchmarks/threshold_whatif.py` does for the mean key:

    python docs/results/counterfact-T100-key-radius/token_match.py \\
        --save runs/cf100/checkpoint/editor --data counterfact --edits 100

Reads the routed tokens' value-matrix inputs through the editor's internal capture
(`_prompt_batch_acts`); an experiment, not an interface.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from wise_edit import WiseEditor, models
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.wise.router import route


def token_inputs(editor: WiseEditor, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's routed tokens' inputs (t, I), unit length."""
    out = []
    for i in range(0, len(prompts), 32):
        acts, mask = editor._prompt_batch_acts(prompts[i : i + 32])
        out += [F.normalize(a[m.bool()].float(), dim=-1).cpu() for a, m in zip(acts, mask)]
    return out


def token_match(probes: list[torch.Tensor], edits: list[torch.Tensor], owner: torch.Tensor):
    """(M, B): per memory, its best edit's mean over edit tokens of the best cosine
    among the probe's tokens."""
    memories = int(owner.max()) + 1
    out = torch.full((memories, len(probes)), -1.0)
    for b, probe in enumerate(probes):
        for e, edit in enumerate(edits):
            match = (edit @ probe.t()).max(dim=1).values.mean()
            out[owner[e], b] = torch.maximum(out[owner[e], b], match)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True)
    parser.add_argument("--data", default="counterfact")
    parser.add_argument("--edits", type=int, required=True)
    parser.add_argument("--same-form", type=int, default=100)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.6, 0.65, 0.7, 0.75, 0.8])
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2-135m")
    editor = WiseEditor.from_pretrained(model, tokenizer, args.save)
    loaded = load_dataset(args.data, default_data_dir(), limit=args.edits + args.same_form)
    records = loaded[: args.edits]
    owner = torch.tensor([editor.memory_holding(i) for i in range(args.edits)])
    with_para = [i for i in range(args.edits) if records[i].rephrase]
    with_loc = [i for i in range(args.edits) if records[i].loc]
    none = torch.full((max(len(with_loc), len(loaded)),), -1)
    groups = {
        "edit -> own": ([r.prompt for r in records], owner),
        "paraphrase -> own": ([records[i].rephrase for i in with_para], owner[with_para]),
        "locality -> none": ([records[i].loc for i in with_loc], none[: len(with_loc)]),
        "same-form -> none": ([r.prompt for r in loaded[args.edits :]], none[: args.same_form]),
    }
    edits = token_inputs(editor, [r.prompt for r in records])
    thresholds = torch.tensor(editor.thresholds)
    measured = {}
    for name, (prompts, want) in groups.items():
        scores = torch.cat(
            [editor.activation_scores(prompts[i : i + 32]) for i in range(0, len(prompts), 32)],
            dim=1,
        )
        measured[name] = (scores, token_match(token_inputs(editor, prompts), edits, owner), want)
    print("| token-match radius | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for tau in [0.0, *args.taus]:
        cells = []
        for scores, match, want in measured.values():
            routed = route(scores.masked_fill(match < tau, float("-inf")), thresholds)
            cells.append(f"{float((routed == want).float().mean()):.2f}")
        print(f"| {tau} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
