"""benchmarks/merge_compare.py rests on one claim: in retrieve mode the merge method does
not change what is trained, so a stream trained once and merged again with another method
equals a stream trained with that method. Checked exactly on a tiny model, also after the
kept memories went through their files."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor

ROOT = Path(__file__).resolve().parents[2]

# memories of 2 shards x 1 edit, half the entries each (so shards overlap and merges
# differ), replay on: edits 0-3 fill two memories that merge and close, 4-5 a third
CONFIG = fast_config(
    mode="retrieve",
    mask_ratio=0.5,
    shard_size=1,
    shards_per_merge=2,
    merge_method="ties",
    merge_density=0.5,
    replay=True,
    replay_rows=2,
)


@pytest.fixture
def merge_compare(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import merge_compare

    return merge_compare


def _memories(editor: WiseEditor) -> list[tuple[torch.Tensor, float, tuple[int, ...]]]:
    return [(m.delta.clone(), m.epsilon, m.edit_ids) for m in editor.memories]


def _trained(cls, tokenizer, config):
    editor = cls(tiny_model(), tokenizer, config)
    editor.edit_many(EDITS[:5])
    return editor


@pytest.mark.parametrize("method", ["linear", "dare"])
def test_a_stream_merged_again_equals_one_trained_with_that_method(
    merge_compare, tokenizer, tmp_path, method
):
    keeper = _trained(merge_compare.ShardKeeper, tokenizer, CONFIG)
    direct = _trained(WiseEditor, tokenizer, replace(CONFIG, merge_method=method))
    assert sorted(keeper.kept) == [0, 1]  # the third memory holds one edit, unmerged
    ties = _memories(keeper)
    assert not torch.equal(ties[0][0], _memories(direct)[0][0])  # the methods do differ

    keeper.remerge(method)
    for (a, eps_a, ids_a), (b, eps_b, ids_b) in zip(_memories(keeper), _memories(direct)):
        assert torch.equal(a, b) and eps_a == eps_b and ids_a == ids_b

    # through the files: an editor save plus the kept memories, loaded into a new keeper
    keeper.save_kept(tmp_path)
    keeper.save_pretrained(tmp_path / "editor")
    loaded = merge_compare.ShardKeeper.from_pretrained(tiny_model(), tokenizer, tmp_path / "editor")
    loaded.load_kept(tmp_path)
    loaded.remerge("ties")
    for (a, eps_a, _), (b, eps_b, _) in zip(_memories(loaded), ties):
        assert torch.equal(a, b) and eps_a == eps_b


def test_the_keeper_refuses_merge_mode_and_a_merged_memory_it_did_not_keep(
    merge_compare, tokenizer, tmp_path
):
    with pytest.raises(ValueError, match="retrieve mode"):
        merge_compare.ShardKeeper(
            tiny_model(), tokenizer, replace(CONFIG, mode="merge", replay=False)
        )
    keeper = _trained(merge_compare.ShardKeeper, tokenizer, CONFIG)
    state, tensors = keeper.kept[0]  # kept files written before a save that did not land
    keeper.kept[7] = (state, {k: v.clone() for k, v in tensors.items()})
    keeper.save_kept(tmp_path)
    keeper.save_pretrained(tmp_path / "editor")
    loaded = merge_compare.ShardKeeper.from_pretrained(tiny_model(), tokenizer, tmp_path / "editor")
    loaded.load_kept(tmp_path)
    assert sorted(loaded.kept) == [0, 1]

    keeper.kept.pop(7)
    keeper.kept.pop(1)
    keeper.save_kept(tmp_path)
    keeper.save_pretrained(tmp_path / "editor", replace=True)
    loaded = merge_compare.ShardKeeper.from_pretrained(tiny_model(), tokenizer, tmp_path / "editor")
    with pytest.raises(ValueError, match="kept memories"):
        loaded.load_kept(tmp_path)


def test_scores_already_evaluated_survive_a_kill_for_the_same_number_of_edits(
    merge_compare, tmp_path
):
    done = merge_compare.EvaluatedScores(tmp_path / "scores.json", 1000)
    done.add("ties", {"tf_rel_all": 0.5})
    again = merge_compare.EvaluatedScores(tmp_path / "scores.json", 1000)
    assert "ties" in again and again["ties"] == {"tf_rel_all": 0.5} and "dare" not in again
    assert "ties" not in merge_compare.EvaluatedScores(tmp_path / "scores.json", 900)


def test_the_baseline_of_the_scored_records_reads_as_the_full_one(merge_compare, tmp_path):
    from wise_edit.data import EditRecord

    # records 1 and 4 have no probe; a probe record is its own index, per kind
    records = [
        EditRecord(f"p{i}", "t", loc=None if i in (1, 4) else f"l{i}", loc_ans="a")
        for i in range(6)
    ]
    probed = [i for i, r in enumerate(records) if r.loc]
    full = merge_compare.ProbeBaseline(list(range(6)), {"k": [[i] for i in probed]})
    covered = [0, 1, 3, 5]
    cut = merge_compare.ProbeBaseline(covered, {"k": [[i] for i in covered if i in probed]})
    cut.save(tmp_path / "baseline.json")
    loaded = merge_compare.ProbeBaseline.load(tmp_path / "baseline.json", 6)
    assert loaded.of(records, [1, 3, 5]) == full.of(records, [1, 3, 5]) == {"k": [[3], [5]]}
    with pytest.raises(ValueError, match="does not cover records \\[2\\]"):
        loaded.of(records, [2, 3])
    # a baseline.json written before the cut (the plain per-kind lists) covers every record
    (tmp_path / "old.json").write_text('{"k": [[0], [2], [3], [5]]}')
    old = merge_compare.ProbeBaseline.load(tmp_path / "old.json", 6)
    assert old.of(records, [0, 2, 4]) == {"k": [[0], [2]]}


def test_the_scored_records_are_both_samples(merge_compare):
    from argparse import Namespace

    from wise_edit.evaluation import sample_indices

    covered = merge_compare.scored_indices(1000, Namespace(sample=200, answer_sample=100))
    assert covered == sample_indices(1000, 200)  # the answer sample is the first 100 of it
    assert set(sample_indices(1000, 100)) <= set(covered)
