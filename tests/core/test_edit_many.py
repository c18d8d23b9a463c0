"""`edit_many` across methods: groups of edits, and the methods that cannot batch."""

import pytest
from conftest import EDITS
from editors import make


@pytest.mark.parametrize("name", ["grace", "ft-l", "rome", "wise-merge"])
def test_methods_that_edit_one_at_a_time_refuse_a_batch(name):
    editor = make(name)
    with pytest.raises(ValueError, match="one at a time|side memory of its own"):
        editor.edit_many(EDITS[:2], batch=2)
    assert editor.num_edits == 0


def test_memit_solves_for_each_group_at_once():
    editor = make("memit")
    results = editor.edit_many(EDITS[:3], batch=2)
    assert [r.index for r in results] == [0, 1, 2]
    assert [e["batch"] for e in editor.edit_log] == [2, 2, 1]


def test_metas_go_with_their_edits_and_must_match_the_records():
    editor = make("grace")
    editor.edit_many(EDITS[:2], metas=[{"source": "a"}, None])
    assert editor.edit_log[0]["meta"] == {"source": "a"} and "meta" not in editor.edit_log[1]
    with pytest.raises(ValueError, match="1 metas for 2 records"):
        editor.edit_many(EDITS[2:4], metas=[None])
    assert editor.num_edits == 2
