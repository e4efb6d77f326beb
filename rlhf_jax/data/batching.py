"""Padding, length buckets and packing: token lists -> dicts of numpy arrays.

Every function here returns ``(arrays, report)``: ``arrays`` is a dict of numpy arrays
(int32 ids and positions, bool masks) ready for ``jax.device_put(arrays, sharding)``, and
``report`` is a :class:`LengthReport` saying which inputs became rows and how many were
truncated or skipped for being longer than the maximum. The over-long policy
``on_too_long`` is one of

- ``"truncate"`` (the default): cut the sequence to fit and count it;
- ``"skip"``: drop it and count it;
- ``"raise"``: raise :class:`~rlhf_jax.data.errors.DataError` naming the example.

Layouts (``B`` rows, ``L`` the padded width):

- prompts for the sampler are *left* padded, so every prompt ends at column ``L - 1``
  and generation appends to the right of all rows at once;
- ``(prompt, response)`` sequences for the losses are *right* padded, with
  ``attention_mask`` (real tokens) and ``response_mask`` (response tokens) aligned to
  ``input_ids``; the response mask marks the tokens whose log-probability the objectives
  use (the model predicts ``input_ids[t]`` from position ``t - 1``);
- packed SFT rows hold several sequences each, with ``segment_ids`` (1, 2, ... per
  sequence, 0 on padding) and ``positions`` that restart at 0 for every segment, so an
  attention mask ``segment_ids[q] == segment_ids[k] != 0`` (plus causality) keeps the
  sequences independent.

Widths: with ``buckets=None`` every batch is padded to ``max_length`` (one shape, one
compilation); with ``buckets`` (e.g. :func:`default_buckets`) it is padded to the smallest
bucket that holds its longest row, trading a few compilations for less padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from rlhf_jax.data.errors import DataError, Reason

OnTooLong = Literal["truncate", "skip", "raise"]
_POLICIES = ("truncate", "skip", "raise")


@dataclasses.dataclass(frozen=True)
class LengthReport:
    """What happened to over-long inputs.

    Attributes:
      kept: int ``[B]`` indices of the inputs that became rows, in row order (for
        packing: the inputs that were placed, in input order).
      truncated: number of inputs cut to fit.
      skipped: number of inputs dropped.
    """

    kept: np.ndarray
    truncated: int
    skipped: int


def default_buckets(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` up to, and ending exactly at, ``max_length``."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"lengths must be positive, got {max_length=} {min_length=}")
    buckets, width = [], min_length
    while width < max_length:
        buckets.append(width)
        width *= 2
    buckets.append(max_length)
    return tuple(buckets)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= length``; raises if ``length`` exceeds every bucket."""
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")
    return fitting[0]


def _check_policy(on_too_long: str) -> None:
    if on_too_long not in _POLICIES:
        raise ValueError(f"on_too_long must be one of {_POLICIES}, got {on_too_long!r}")


def _width(longest: int, max_length: int, buckets: Sequence[int] | None) -> int:
    if buckets is None:
        return max_length
    if max(buckets) < max_length:
        raise ValueError(f"largest bucket {max(buckets)} is below max_length {max_length}")
    return bucket_length(max(longest, 1), buckets)


def _as_int_array(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32).reshape(-1)


def _too_long(index: int, length: int, max_length: int) -> DataError:
    return DataError(
        Reason.TOO_LONG,
        f"example {index}",
        f"{length} tokens > max_length {max_length}; shorten it, raise max_length or "
        "use on_too_long='truncate' or 'skip'",
    )


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position of each real token counted from the row's first real token; 0 on padding."""
    return np.where(mask, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def pad_prompts_left(
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_length: int,
    buckets: Sequence[int] | None = None,
    on_too_long: OnTooLong = "truncate",
) -> tuple[dict[str, np.ndarray], LengthReport]:
    """Left-pad prompts for generation.

    Truncation keeps the *last* ``max_length`` tokens (the end of a prompt holds the turn
    being answered and the ``<assistant>`` marker).

    Returns:
      ``{"input_ids": int32 [B, L], "attention_mask": bool [B, L], "positions": int32 [B, L]}``
      and a :class:`LengthReport`.
    """
    _check_policy(on_too_long)
    rows, kept, truncated = [], [], 0
    for i, prompt in enumerate(prompts):
        ids = _as_int_array(prompt)
        if len(ids) > max_length:
            if on_too_long == "raise":
                raise _too_long(i, len(ids), max_length)
            if on_too_long == "skip":
                continue
            ids, truncated = ids[len(ids) - max_length :], truncated + 1
        rows.append(ids)
        kept.append(i)
    width = _width(max((len(r) for r in rows), default=0), max_length, buckets)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for r, ids in enumerate(rows):
        if len(ids):
            input_ids[r, width - len(ids) :] = ids
            mask[r, width - len(ids) :] = True
    arrays = {"input_ids": input_ids, "attention_mask": mask, "positions": _positions(mask)}
    report = LengthReport(np.asarray(kept, np.int32), truncated, len(prompts) - len(kept))
    return arrays, report


def _fit_prompt_response(
    prompt: np.ndarray, response: np.ndarray, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the response's end; a prompt with no room left keeps its last tokens.

    The prompt keeps ``max_length - 1`` tokens, leaving room for one response token.
    """
    if len(prompt) >= max_length:
        keep_prompt = max_length - min(1, len(response))
        prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, response[: max_length - len(prompt)]


def _right_pad_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], width: int, pad_id: int
) -> dict[str, np.ndarray]:
    input_ids = np.full((len(pairs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(pairs), width), dtype=bool)
    response_mask = np.zeros((len(pairs), width), dtype=bool)
    for r, (prompt, response) in enumerate(pairs):
        total = len(prompt) + len(response)
        input_ids[r, :total] = np.concatenate([prompt, response])
        mask[r, :total] = True
        response_mask[r, len(prompt) : total] = True
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "response_mask": response_mask,
        "positions": _positions(mask),
    }


def _fit_all(
    index: int,
    prompt: np.ndarray,
    responses: Sequence[np.ndarray],
    max_length: int,
    on_too_long: OnTooLong,
) -> tuple[list[tuple[np.ndarray, np.ndarray]] | None, bool]:
    """Fit ``prompt + response`` for each response; ``(None, _)`` means skip."""
    longest = max(len(prompt) + len(r) for r in responses)
    if longest <= max_length:
        return [(prompt, r) for r in responses], False
    if on_too_long == "raise":
        raise _too_long(index, longest, max_length)
    if on_too_long == "skip":
        return None, False
    return [_fit_prompt_response(prompt, r, max_length) for r in responses], True


def pad_prompt_responses(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_length: int,
    buckets: Sequence[int] | None = None,
    on_too_long: OnTooLong = "truncate",
) -> tuple[dict[str, np.ndarray], LengthReport]:
    """Right-pad ``prompt + response`` sequences for the losses.

    Truncation cuts the end of the response; a prompt of ``max_length`` tokens or more
    keeps its last ``max_length - 1`` tokens so one response token remains.

    Returns:
      ``{"input_ids", "attention_mask", "response_mask", "positions"}``, each ``[B, L]``,
      and a :class:`LengthReport`.
    """
    _check_policy(on_too_long)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows, kept, truncated = [], [], 0
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        fitted, was_cut = _fit_all(
            i, _as_int_array(prompt), [_as_int_array(response)], max_length, on_too_long
        )
        if fitted is None:
            continue
        rows.extend(fitted)
        kept.append(i)
        truncated += was_cut
    width = _width(max((len(p) + len(r) for p, r in rows), default=0), max_length, buckets)
    report = LengthReport(np.asarray(kept, np.int32), truncated, len(prompts) - len(kept))
    return _right_pad_pairs(rows, width, pad_id), report


def pad_preference_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_length: int,
    buckets: Sequence[int] | None = None,
    on_too_long: OnTooLong = "truncate",
) -> tuple[dict[str, np.ndarray], LengthReport]:
    """Right-pad (prompt, chosen) and (prompt, rejected) to one common width.

    A pair is truncated, skipped or raised as a unit when either side is too long, so
    the two rows of a pair always share the same prompt tokens.

    Returns:
      ``chosen_{input_ids, attention_mask, response_mask, positions}`` and the same four
      ``rejected_*`` keys, each ``[B, L]``, and a :class:`LengthReport` counting pairs.
    """
    _check_policy(on_too_long)
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    chosen_rows, rejected_rows, kept, truncated = [], [], [], 0
    for i, (prompt, good, bad) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        responses = [_as_int_array(good), _as_int_array(bad)]
        fitted, was_cut = _fit_all(i, _as_int_array(prompt), responses, max_length, on_too_long)
        if fitted is None:
            continue
        chosen_rows.append(fitted[0])
        rejected_rows.append(fitted[1])
        kept.append(i)
        truncated += was_cut
    longest = max((len(p) + len(r) for p, r in chosen_rows + rejected_rows), default=0)
    width = _width(longest, max_length, buckets)
    arrays = {}
    for side, rows in (("chosen", chosen_rows), ("rejected", rejected_rows)):
        for key, value in _right_pad_pairs(rows, width, pad_id).items():
            arrays[f"{side}_{key}"] = value
    report = LengthReport(np.asarray(kept, np.int32), truncated, len(prompts) - len(kept))
    return arrays, report


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[bool]],
    *,
    row_length: int,
    pad_id: int,
    num_rows: int | None = None,
    on_too_long: OnTooLong = "truncate",
) -> tuple[dict[str, np.ndarray], LengthReport]:
    """Pack sequences into rows of ``row_length`` tokens for SFT (first fit, input order).

    Each sequence goes, whole, into the first row with room for it; a new row is opened
    otherwise. Truncation keeps a too-long sequence's first ``row_length`` tokens.

    Args:
      sequences: token ids per sequence (e.g. ``RenderedChat.ids``).
      loss_masks: bool per token (e.g. ``RenderedChat.assistant_mask``), same lengths.
      row_length: tokens per row.
      pad_id: id written on padding.
      num_rows: pad the output to this many rows (raise if more are needed); ``None``
        returns as many rows as the packing used.
      on_too_long: policy for sequences longer than ``row_length``.

    Returns:
      ``{"input_ids", "segment_ids", "positions", "loss_mask"}``, each ``[R, row_length]``
      (segment ids start at 1 in every row, 0 marks padding; the loss mask is zero on
      padding), and a :class:`LengthReport`.
    """
    _check_policy(on_too_long)
    if len(sequences) != len(loss_masks):
        raise ValueError(f"{len(sequences)} sequences but {len(loss_masks)} loss masks")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    free: list[int] = []
    kept, truncated = [], 0
    for i, (seq, mask) in enumerate(zip(sequences, loss_masks, strict=True)):
        ids, loss = _as_int_array(seq), np.asarray(mask, dtype=bool).reshape(-1)
        if ids.shape != loss.shape:
            raise ValueError(f"example {i}: {len(ids)} tokens but {len(loss)} loss-mask entries")
        if len(ids) > row_length:
            if on_too_long == "raise":
                raise _too_long(i, len(ids), row_length)
            if on_too_long == "skip":
                continue
            ids, loss, truncated = ids[:row_length], loss[:row_length], truncated + 1
        target = next((r for r, room in enumerate(free) if room >= len(ids)), None)
        if target is None:
            rows.append([])
            free.append(row_length)
            target = len(rows) - 1
        rows[target].append((ids, loss))
        free[target] -= len(ids)
        kept.append(i)
    total_rows = len(rows) if num_rows is None else num_rows
    if total_rows < len(rows):
        raise ValueError(f"packing needs {len(rows)} rows but num_rows={num_rows}")
    shape = (total_rows, row_length)
    arrays = {
        "input_ids": np.full(shape, pad_id, dtype=np.int32),
        "segment_ids": np.zeros(shape, dtype=np.int32),
        "positions": np.zeros(shape, dtype=np.int32),
        "loss_mask": np.zeros(shape, dtype=bool),
    }
    for r, segments in enumerate(rows):
        start = 0
        for segment, (ids, loss) in enumerate(segments, start=1):
            span = slice(start, start + len(ids))
            arrays["input_ids"][r, span] = ids
            arrays["segment_ids"][r, span] = segment
            arrays["positions"][r, span] = np.arange(len(ids), dtype=np.int32)
            arrays["loss_mask"][r, span] = loss
            start += len(ids)
    report = LengthReport(np.asarray(kept, np.int32), truncated, len(sequences) - len(kept))
    return arrays, report
