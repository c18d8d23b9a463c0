# Experiment: Is ZsRE's lower TF Gen at T = 1000 forgetting along the stream, or which records are
#   scored?
# Decided: The records: on the same 100 the T = 1000 editor matches the T = 100 one (.797 / .801);
#   the gap is the router's reach on hard paraphrases, not forgetting; nothing changed
# Ran at: d397404, as docs/results/tf-gen-by-records/by_records.py. Output:
#   docs/notebook/results/tf-gen-by-records/
"""Is ZsRE's TF Gen at T = 1000 (.74 on the bench's sample of 200) lower than at T = 100
(.81) because of the thousand edits, or because of which records are scored? The saved
T = 1000 editor and the saved T = 100 editor, each scored (TF Gen, TF Rel, paraphrase ->
own memory) on the first 100 records, and the T = 1000 one also on its sample of 200.

    python by_records.py SAVE_T1000 SAVE_T100
"""

import statistics
import sys

import torch

from wise_edit import WiseEditor, models
from wise_edit.data import default_data_dir, load_zsre
from wise_edit.evaluation import sample_indices
from wise_edit.metrics import token_accuracy


def scores(save, records, picked):
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    editor = WiseEditor.from_pretrained(model, tokenizer, save)
    chosen = [records[i] for i in picked]
    with torch.no_grad():
        gen = [token_accuracy(model, editor.format, r.rephrase, r.target) for r in chosen]
        rel = [token_accuracy(model, editor.format, r.prompt, r.target) for r in chosen]
        routed = editor.routed([r.rephrase for r in chosen])
    own = [c == editor.memory_holding(i) for c, i in zip(routed, picked)]
    return statistics.fmean(rel), statistics.fmean(gen), sum(own) / len(own)


def main():
    t1000, t100 = sys.argv[1], sys.argv[2]
    records = load_zsre(str(default_data_dir()), limit=1000)
    rows = {
        "T = 1000 save, the bench's sample of 200": (t1000, sample_indices(1000, 200)),
        "T = 1000 save, records 0-99": (t1000, list(range(100))),
        "T = 100 save, records 0-99": (t100, list(range(100))),
        "T = 1000 save, the sample's records among 0-99": (
            t1000,
            [i for i in sample_indices(1000, 200) if i < 100],
        ),
        "T = 100 save, the sample's records among 0-99": (
            t100,
            [i for i in sample_indices(1000, 200) if i < 100],
        ),
    }
    print("| editor, records | n | TF Rel | TF Gen | paraphrase -> own memory |")
    print("|---|---|---|---|---|")
    for name, (save, picked) in rows.items():
        rel, gen, own = scores(save, records, picked)
        print(f"| {name} | {len(picked)} | {rel:.3f} | {gen:.3f} | {own:.3f} |", flush=True)


if __name__ == "__main__":
    main()
