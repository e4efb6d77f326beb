"""The bad-input policy: raise names the place and the reason; skip counts by reason."""

import logging

import pytest

from rlhf_jax.data.errors import DataError, ErrorPolicy, IssueLog, Reason


def test_default_policy_raises_on_errors_and_skips_ties():
    policy = ErrorPolicy()
    assert policy.action(Reason.TIE) == "skip"
    for reason in Reason:
        if reason is not Reason.TIE:
            assert policy.action(reason) == "raise"


@pytest.mark.parametrize("kwargs", [{"on_error": "ignore"}, {"on_tie": "drop"}])
def test_unknown_action_is_rejected_naming_the_knob(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ErrorPolicy(**kwargs)


def test_raise_names_file_line_reason_and_detail():
    issues = IssueLog(ErrorPolicy(on_error="raise"))
    with pytest.raises(DataError) as caught:
        issues.report(Reason.MISSING_FIELD, "train.jsonl:7", "field 'chosen' is missing")
    error = caught.value
    assert (error.reason, error.where) == (Reason.MISSING_FIELD, "train.jsonl:7")
    assert str(error) == "train.jsonl:7: missing_field: field 'chosen' is missing"
    assert issues.as_dict() == {}


def test_skip_counts_by_reason_and_logs(caplog):
    issues = IssueLog(ErrorPolicy(on_error="skip", on_tie="skip"))
    with caplog.at_level(logging.WARNING):
        for line in range(3):
            issues.report(Reason.EMPTY_TEXT, f"a.jsonl:{line}", "empty")
        issues.report(Reason.TIE, "a.jsonl:9", "tie")
    assert issues.as_dict() == {"empty_text": 3, "tie": 1}
    assert "a.jsonl:9" in caplog.text and "a.jsonl:0" in caplog.text


def test_ties_follow_their_own_knob():
    issues = IssueLog(ErrorPolicy(on_error="skip", on_tie="raise"))
    issues.report(Reason.TOO_LONG, "x:1", "long")
    with pytest.raises(DataError, match="tie"):
        issues.report(Reason.TIE, "x:2", "equal")
    assert issues.as_dict() == {"too_long": 1}
