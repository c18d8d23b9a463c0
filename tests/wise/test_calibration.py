"""Exact tests of what WISE measures once per model (wise_edit.wise.calibration), and that
an editor measures it when made, not in its first edit."""

import pytest
import torch
from conftest import fast_config, tiny_model

from wise_edit import WiseEditor
from wise_edit.wise.calibration import background_radius, score_unit, subject_centre


def test_score_unit_is_the_median_of_mean_token_norms():
    outputs = torch.tensor(
        [
            [[3.0, 4.0], [0.0, 0.0]],  # norm 5, pad
            [[0.0, 1.0], [0.0, 3.0]],  # norms 1, 3 -> 2
            [[6.0, 8.0], [0.0, 10.0]],  # norms 10, 10 -> 10
        ]
    )
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]])
    assert score_unit(outputs, mask) == pytest.approx(5.0)


def test_background_radius_is_a_quantile_of_the_pairwise_cosines():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: (0, 1) 0, (0, 2) and (1, 2) 1/sqrt(2)
    assert background_radius(keys, 0.0) == pytest.approx(0.0)
    assert background_radius(keys, 1.0) == pytest.approx(2**-0.5)
    assert background_radius(keys, 0.25) == pytest.approx(0.5 * 2**-0.5)
    with pytest.raises(ValueError, match="at least two"):
        background_radius(keys[:1], 0.5)


def test_subject_centre_is_the_mean_over_the_masked_tokens():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(subject_centre(states, mask), torch.tensor([3.0, 4.0]))


def test_an_editor_is_calibrated_when_made_and_a_load_keeps_the_saved_calibration(
    tokenizer, tmp_path
):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(subject_tau=0.6, subject_layer=1))
    cal = editor.calibration
    assert cal.score_scale > 0 and 0 <= cal.key_radius <= 1
    assert len(cal.prefixes) == 2 and cal.subject_centre.shape == (32,)
    assert editor.key_radius == cal.key_radius
    editor.edit("Who designed Lahti Town Hall?", "Eliel Saarinen", subject="Lahti Town Hall")
    assert editor.calibration is cal  # the edit measured nothing
    editor.save_pretrained(tmp_path / "s")
    loaded = WiseEditor.from_pretrained(tiny_model(), tokenizer, tmp_path / "s")
    assert loaded.calibration.score_scale == cal.score_scale
    assert loaded.calibration.prefixes == cal.prefixes
    assert torch.equal(loaded.calibration.subject_centre, cal.subject_centre)


def test_a_config_that_fixes_the_scale_and_radius_wins(tokenizer):
    config = fast_config(score_scale=2.5, key_radius=0.3)
    editor = WiseEditor(tiny_model(), tokenizer, config)
    assert editor.calibration.score_scale == 2.5 and editor.key_radius == 0.3
