"""The editing loop's stop rules and its cheap steps on the side terms (`core.fit`)."""

from __future__ import annotations

import pytest
import torch

from wise_edit.core.fit import StepLoss, fit


def _trace(entries):
    """A loss_fn replaying (loss, lm, answered) triples."""
    it = iter(entries)

    def loss_fn():
        loss, lm, answered = next(it)
        return StepLoss(torch.tensor(loss), torch.tensor(lm), answered)

    return loss_fn


def _fit_with_side(trace, side_values, side_steps, side_lm_bound=float("inf")):
    """`fit` with the 'answer' stop at 0.5 and side terms replaying ``side_values`` (a
    number: always that); returns the result and the losses each update was given."""
    values = iter(side_values) if isinstance(side_values, list) else None
    updates = []
    fitted = fit(
        _trace(trace),
        updates.append,
        max_steps=10,
        early_stop_loss=0.5,
        stop_on="answer",
        side_loss_fn=lambda: torch.tensor(next(values) if values else side_values),
        side_steps=side_steps,
        side_lm_bound=side_lm_bound,
    )
    return fitted, [u.item() for u in updates]


def test_fit_stops_early_and_counts_forwards():
    losses = iter([3.0, 2.0, 0.001, 0.0005, 0.0001])
    steps = []

    def loss_fn():
        value = torch.tensor(next(losses))
        return StepLoss(value, value)

    fitted = fit(loss_fn, steps.append, max_steps=10, early_stop_loss=0.01, patience=2)
    assert fitted.steps == 4 and len(steps) == 3 and fitted.loss == pytest.approx(0.0005)
    assert fitted.answered_at is None  # no greedy hits reported
    assert fitted.side_steps == 0


def test_fit_answer_stop_needs_greedy_hits_and_small_other_terms():
    # (loss, lm, answered): the LM part stays large; 'answer' looks at the greedy hits
    # and at loss - lm only
    trace = [(5.0, 1.0, False), (2.0, 1.0, True), (1.02, 1.0, False), (1.01, 0.9, True)]
    steps = []
    fitted = fit(_trace(trace), steps.append, max_steps=10, early_stop_loss=0.5, stop_on="answer")
    assert fitted.steps == 4 and fitted.lm_loss == pytest.approx(0.9)
    assert fitted.answered_at == 2  # the first greedy-right step, though it did not stop
    with pytest.raises(ValueError, match="greedy"):
        fit(
            lambda: StepLoss(torch.tensor(1.0), torch.tensor(1.0)),
            steps.append,
            max_steps=3,
            early_stop_loss=0.5,
            stop_on="answer",
        )


def test_once_answered_the_side_terms_get_cheap_updates_until_under_the_bound():
    # forward 1: not answered -> full update; forward 2: answered, margins 1.0 above the
    # bound 0.5 -> side updates while the side terms read 0.9, 0.7 and stop at 0.4;
    # forward 3 (the check): answered and margins under the bound -> stop
    trace = [(5.0, 2.0, False), (3.0, 2.0, True), (2.3, 2.0, True)]
    fitted, updates = _fit_with_side(trace, [0.9, 0.7, 0.4], 5)
    assert fitted.steps == 3 and fitted.side_steps == 2
    assert updates == pytest.approx([5.0, 0.9, 0.7])


def test_side_updates_stop_at_their_limit_and_full_steps_resume_if_the_answer_breaks():
    # forward 2 answered -> 2 side updates (the limit), margins lower but still high;
    # forward 3 finds the answer broken -> a full update; forward 4 answered, margins
    # fine -> stop
    trace = [(5.0, 2.0, False), (3.0, 2.0, True), (4.0, 3.0, False), (2.1, 2.0, True)]
    fitted, updates = _fit_with_side(trace, [0.9, 0.8, 0.7], 2)
    assert fitted.steps == 4 and fitted.side_steps == 2
    assert updates == pytest.approx([5.0, 0.9, 0.8, 4.0])


def test_side_terms_that_do_not_fall_leave_the_rest_to_full_steps():
    # e.g. a side memory still equal to the weight it copies: its scores are 0 and so is
    # their gradient. Two side updates change nothing, so every later step is full
    trace = [(3.0, 2.0, True), (3.0, 2.0, True), (2.1, 2.0, True)]
    fitted, updates = _fit_with_side(trace, 1.0, 2)
    assert fitted.steps == 3 and fitted.side_steps == 2
    assert updates == pytest.approx([1.0, 1.0, 3.0])


def test_side_terms_already_under_the_bound_leave_the_step_to_the_full_loss():
    # answered, loss - lm above the bound, but the side terms are not what is above it:
    # a full update, never a loop of forwards without one
    trace = [(3.0, 2.0, True), (2.1, 2.0, True)]
    fitted, updates = _fit_with_side(trace, 0.0, 4)
    assert fitted.steps == 2 and fitted.side_steps == 0
    assert updates == pytest.approx([3.0])


def test_a_non_finite_side_term_raises():
    with pytest.raises(FloatingPointError, match="side"):
        fit(
            _trace([(3.0, 2.0, True)]),
            lambda loss: None,
            max_steps=5,
            early_stop_loss=0.5,
            stop_on="answer",
            side_loss_fn=lambda: torch.tensor(float("nan")),
            side_steps=3,
        )


def test_side_updates_wait_for_the_target_nll_to_settle():
    # answered at forward 1 but its NLL 2.0 is above the bound 0.1: a full update;
    # forward 2's NLL 0.05 is under it: side updates
    trace = [(3.0, 2.0, True), (1.05, 0.05, True), (0.1, 0.05, True)]
    fitted, updates = _fit_with_side(trace, [0.9, 0.3], 4, side_lm_bound=0.1)
    assert fitted.steps == 3 and fitted.side_steps == 1
    assert updates == pytest.approx([3.0, 0.9])


def test_fitting_sent_the_same_losses_updates_as_fit_and_keeps_side_updates_apart():
    from wise_edit.core.fit import fitting

    trace = [(3.0, 2.9, False), (1.0, 0.01, True), (0.9, 0.01, True), (0.2, 0.01, True)]
    settings = dict(max_steps=10, early_stop_loss=0.5, stop_on="answer", side_steps=1)
    sides = iter([0.9, 0.8, 0.8, 0.8])

    def side():
        return torch.tensor(next(sides))

    alone: list[float] = []
    fitted = fit(_trace(trace), lambda x: alone.append(x.item()), side_loss_fn=side, **settings)
    sides = iter([0.9, 0.8, 0.8, 0.8])
    full, cheap = [], []
    run = fitting(
        lambda x: full.append(x.item()),
        side_update=lambda x: cheap.append(x.item()),
        side_loss_fn=side,
        **settings,
    )
    next(run)
    with pytest.raises(StopIteration) as done:
        for loss, lm, answered in trace:
            run.send(StepLoss(torch.tensor(loss), torch.tensor(lm), answered))
    assert done.value.value == fitted
    assert full == [3.0] and cheap == pytest.approx([0.9, 0.8])
    assert sorted(full + cheap) == sorted(alone)
