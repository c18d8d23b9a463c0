# Experiment: Do subject-swapped negatives drawn from CounterFact's 1000 held-out subjects, instead
#   of the 36 built-in ones, help CounterFact locality at T = 100?
# Decided: No (locality moved by two probes, within run-to-run noise); `subject_negatives` stays 0
# Ran at: b49d534, as docs/results/counterfact-T100-subject-negatives/cf_pool_subjects.py. Output:
#   docs/notebook/results/counterfact-T100-subject-negatives/
"""Experiment: subject-swapped negatives drawn from CounterFact's 1000 held-out subjects
instead of the built-in list (the list is replaced before the run; the editor draws from
it as from the built-in one). Arguments: those of `wise-edit`, e.g. `bench ...`."""

import json
import sys
from pathlib import Path

import wise_edit.wise.editor as wise_editor
from wise_edit.cli import main
from wise_edit.data import COUNTERFACT_POOL

records = json.loads(Path("../shared/data/counterfact/counterfact-train.json").read_text())
wise_editor.NEUTRAL_SUBJECTS = tuple(r["subject"] for r in records[-COUNTERFACT_POOL:])
print("subjects", len(wise_editor.NEUTRAL_SUBJECTS), flush=True)
sys.exit(main(sys.argv[1:]))
