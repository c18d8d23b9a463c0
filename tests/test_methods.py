"""The method registry: every method by its CLI name, and each config's checks."""

import pytest

from wise_edit.baselines import (
    AlphaEditEditor,
    DeferConfig,
    FTLConfig,
    GraceConfig,
    GraceEditor,
    MEMITMassEditor,
)
from wise_edit.methods import METHODS, editor_class


def test_method_registry():
    assert set(METHODS) == {
        "wise",
        "ft-l",
        "ft-ewc",
        "grace",
        "defer",
        "mend",
        "rome",
        "memit",
        "memit-mass",
        "alphaedit",
    }
    assert editor_class("GRACE") is GraceEditor
    assert editor_class("AlphaEdit") is editor_class("alphaedit") is AlphaEditEditor
    assert editor_class("MEMIT-MASS") is MEMITMassEditor
    with pytest.raises(ValueError, match="unknown method"):
        editor_class("serac")
    with pytest.raises(ValueError, match="FTLConfig.lr"):
        FTLConfig(lr=0)
    with pytest.raises(ValueError, match="GraceConfig.epsilon_init"):
        GraceConfig(epsilon_init=-1)
    with pytest.raises(ValueError, match="DeferConfig.threshold"):
        DeferConfig(threshold=1.0)
