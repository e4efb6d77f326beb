"""The bad-input policy shared by every reader of preference data and by batching.

Real preference files contain malformed JSON lines, missing fields, empty or non-UTF-8
text, ties and over-long sequences. Each such problem has a :class:`Reason`, and each
reason is handled by one of two actions:

- ``"raise"``: stop with a :class:`DataError` that names the file, the line and what was
  wrong (and what would be right);
- ``"skip"``: drop the record, count it under its reason and log it. Counts are
  available from :attr:`IssueLog.counts` (and builders store them in their dataset
  metadata), so nothing is ever dropped silently.

Ties are legitimate data in some formats (QA-Feedback has hundreds), so they have their own
knob, ``on_tie``, which defaults to ``"skip"``; every other reason follows ``on_error``,
which defaults to ``"raise"``.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Literal

from absl import logging

OnError = Literal["raise", "skip"]
_ACTIONS = ("raise", "skip")

#: How many skipped records per reason are logged one by one before only counting.
LOGGED_PER_REASON = 5


class Reason(enum.StrEnum):
    """Why a record could not be used."""

    MALFORMED_JSON = "malformed_json"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_FIELD = "missing_field"
    BAD_VALUE = "bad_value"
    EMPTY_TEXT = "empty_text"
    INCONSISTENT = "inconsistent"
    TIE = "tie"
    TOO_LONG = "too_long"


class DataError(ValueError):
    """A record that the policy says must stop the run.

    Attributes:
      reason: the :class:`Reason`.
      where: ``"path:line"`` (or another locator, e.g. ``"example 3"`` in a batch).
      detail: what was wrong and what would be right.
    """

    def __init__(self, reason: Reason, where: str, detail: str):
        self.reason = reason
        self.where = where
        self.detail = detail
        super().__init__(f"{where}: {reason.value}: {detail}")


def validate_action(name: str, action: str) -> OnError:
    """Return ``action`` if it is ``"raise"`` or ``"skip"``, else raise naming ``name``."""
    if action not in _ACTIONS:
        raise ValueError(f"{name} must be one of {_ACTIONS}, got {action!r}")
    return action  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ErrorPolicy:
    """Which action each :class:`Reason` gets.

    Attributes:
      on_error: action for every reason except ties (default ``"raise"``).
      on_tie: action for ties (default ``"skip"``: ties are data, not corruption).
    """

    on_error: OnError = "raise"
    on_tie: OnError = "skip"

    def __post_init__(self):
        validate_action("on_error", self.on_error)
        validate_action("on_tie", self.on_tie)

    def action(self, reason: Reason) -> OnError:
        """The action taken for ``reason``."""
        return self.on_tie if reason is Reason.TIE else self.on_error


class IssueLog:
    """Applies an :class:`ErrorPolicy` and counts what was skipped, by reason.

    Usage: ``issues.report(Reason.EMPTY_TEXT, "train.jsonl:12", "field 'chosen' is empty")``
    either raises :class:`DataError` or counts and logs; the caller then drops the record.
    """

    def __init__(self, policy: ErrorPolicy | None = None):
        self.policy = policy or ErrorPolicy()
        self.counts: collections.Counter[str] = collections.Counter()

    def report(self, reason: Reason, where: str, detail: str) -> None:
        """Raise or count one problem, according to the policy."""
        if self.policy.action(reason) == "raise":
            raise DataError(reason, where, detail)
        self.counts[reason.value] += 1
        if self.counts[reason.value] <= LOGGED_PER_REASON:
            logging.warning("skipped %s: %s: %s", where, reason.value, detail)

    def as_dict(self) -> dict[str, int]:
        """Counts of skipped records by reason value (reasons never seen are absent)."""
        return dict(sorted(self.counts.items()))

    def log_summary(self, context: str) -> None:
        """Log the total skipped per reason (at INFO when nothing was skipped)."""
        if self.counts:
            logging.warning("%s: skipped records by reason: %s", context, self.as_dict())
        else:
            logging.info("%s: no records skipped", context)
