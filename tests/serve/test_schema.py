"""Request bodies checked before anything is logged."""

import pytest

from wise_edit.serve.schema import BadRequest, Limits, edits

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"


def test_a_request_may_name_the_subject_its_prompt_names():
    limits = Limits()
    body = {"prompt": PROMPT, "target": TARGET, "subject": SUBJECT}
    assert edits(body, limits) == [body]
    with pytest.raises(BadRequest, match="does not occur") as err:
        edits([body, {**body, "subject": "Helsinki"}], limits)
    assert err.value.param == "[1].subject"
    with pytest.raises(BadRequest) as err:
        edits({**body, "subject": 3}, limits)
    assert err.value.param == "subject"
