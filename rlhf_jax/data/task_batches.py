"""Dialogues, preference pairs and prompts -> fixed-shape numpy arrays for the training steps.

Every function here renders text with the chat template (:mod:`rlhf_jax.data.chat`) and
pads it with :mod:`rlhf_jax.data.batching` to a width fixed by the caller, so that every
batch of a run has one shape and each step compiles once. The arrays are held in memory
and cut into training batches by the loop's ``EpochPermutationSchedule`` (epoch ``e``
visits the examples in the permutation drawn from ``(seed, e)``, so the batch of any step
is a pure function of the step number and a resumed run reads exactly the data it would
have read) and into evaluation batches by :func:`sequential_batches`.

Layouts (``N`` examples, ``L = max_length``):

- SFT (:func:`sft_arrays`): right padded ``input_ids``, ``attention_mask``,
  ``positions`` and ``loss_mask`` (the assistant tokens and the eos closing each assistant
  turn), all ``[N, L]``; :func:`packed_sft_arrays` packs several dialogues per row and
  adds ``segment_ids``.
- Preferences (:func:`preference_arrays`): ``chosen_*`` and ``rejected_*`` versions of
  ``input_ids``, ``attention_mask``, ``response_mask`` and ``positions``, ``[N, L]``,
  the two rows of a pair sharing the prompt tokens; optional per-pair flags ``[N]``
  (e.g. ``chosen_is_safe``) travel with them.
- Prompts for the sampler (:func:`prompt_arrays`): left padded ``input_ids``,
  ``attention_mask``, ``positions``, ``[N, P]``.

The embedded task (:mod:`rlhf_jax.data.embedded_task`) is read through
:func:`task_sft_arrays`, :func:`task_preference_arrays` (helpfulness labels or, with
``label="safer"``, harmlessness labels with the PKU-SafeRLHF safety flags of Dai et al.,
2023, "Safe RLHF") and :func:`task_prompt_arrays`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np

from rlhf_jax.data.batching import (
    OnTooLong,
    pack_sequences,
    pad_preference_pairs,
    pad_prompts_left,
)
from rlhf_jax.data.chat import Turn, render_chat, render_prompt, render_response
from rlhf_jax.data.embedded_task import PreferencePair, Prompt, SFTExample, to_dialogue
from rlhf_jax.data.tokenizers import Tokenizer

Arrays = dict[str, np.ndarray]
PreferenceLabel = Literal["better", "safer"]


def _right_pad_rendered(
    ids: Sequence[np.ndarray],
    loss_masks: Sequence[np.ndarray],
    *,
    pad_id: int,
    max_length: int,
    on_too_long: OnTooLong,
) -> tuple[Arrays, np.ndarray]:
    """Right-pad token rows with their loss masks; returns the arrays and the kept indices."""
    kept = []
    rows = []
    for index, (row, mask) in enumerate(zip(ids, loss_masks, strict=True)):
        if len(row) > max_length:
            if on_too_long == "raise":
                raise ValueError(
                    f"dialogue {index}: {len(row)} tokens > max_length {max_length}; raise "
                    "max_length or use on_too_long='truncate' or 'skip'"
                )
            if on_too_long == "skip":
                continue
            row, mask = row[:max_length], mask[:max_length]
        rows.append((row, mask))
        kept.append(index)
    shape = (len(rows), max_length)
    arrays = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "attention_mask": np.zeros(shape, bool),
        "loss_mask": np.zeros(shape, bool),
    }
    for r, (row, mask) in enumerate(rows):
        arrays["input_ids"][r, : len(row)] = row
        arrays["attention_mask"][r, : len(row)] = True
        arrays["loss_mask"][r, : len(row)] = mask
    arrays["positions"] = np.maximum(np.cumsum(arrays["attention_mask"], axis=1) - 1, 0).astype(
        np.int32
    )
    return arrays, np.asarray(kept, np.int32)


def sft_arrays(
    dialogues: Sequence[Sequence[Turn]],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    on_too_long: OnTooLong = "truncate",
) -> Arrays:
    """Right-padded SFT rows whose loss mask covers the assistant turns only.

    Args:
      dialogues: ``(role, text)`` turns per dialogue.
      tokenizer: renders the chat template.
      max_length: the padded width ``L``; longer dialogues are cut at the end
        (``"truncate"``), dropped (``"skip"``) or rejected (``"raise"``).
      on_too_long: the over-long policy.

    Returns:
      ``input_ids`` int32, ``attention_mask`` bool, ``loss_mask`` bool and ``positions``
      int32, each ``[N, L]``, with ``loss_mask[t]`` set exactly on the tokens
      ``render_chat`` marks as assistant tokens.
    """
    rendered = [render_chat(d, tokenizer) for d in dialogues]
    arrays, _ = _right_pad_rendered(
        [r.ids for r in rendered],
        [r.assistant_mask for r in rendered],
        pad_id=tokenizer.pad_id,
        max_length=max_length,
        on_too_long=on_too_long,
    )
    return arrays


def packed_sft_arrays(
    dialogues: Sequence[Sequence[Turn]],
    tokenizer: Tokenizer,
    *,
    row_length: int,
    on_too_long: OnTooLong = "truncate",
) -> Arrays:
    """SFT rows with several dialogues packed per row (first fit, in input order).

    Args:
      dialogues: ``(role, text)`` turns per dialogue.
      tokenizer: renders the chat template.
      row_length: tokens per row.
      on_too_long: policy for a dialogue longer than a row.

    Returns:
      ``input_ids``, ``segment_ids`` (1, 2, ... per dialogue, 0 on padding),
      ``positions`` (restarting at 0 in every segment), ``loss_mask`` and
      ``attention_mask`` (``segment_ids > 0``), each ``[R, row_length]``.
    """
    rendered = [render_chat(d, tokenizer) for d in dialogues]
    arrays, _ = pack_sequences(
        [r.ids for r in rendered],
        [r.assistant_mask for r in rendered],
        row_length=row_length,
        pad_id=tokenizer.pad_id,
        on_too_long=on_too_long,
    )
    arrays["attention_mask"] = arrays["segment_ids"] > 0
    return arrays


def preference_arrays(
    prompts: Sequence[Sequence[Turn]],
    chosen: Sequence[str],
    rejected: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    flags: Mapping[str, Sequence] | None = None,
    on_too_long: OnTooLong = "truncate",
) -> Arrays:
    """Right-padded (prompt, chosen) and (prompt, rejected) rows of one common width.

    The prompt is ``render_prompt(turns)`` (ending with the ``<assistant>`` marker) and
    each response is ``render_response(text)`` (its text and eos), so the response mask
    marks the tokens a policy generates.

    Args:
      prompts: the conversation before the compared replies, per pair.
      chosen: the preferred reply text, per pair.
      rejected: the other reply text, per pair.
      tokenizer: renders the chat template.
      max_length: the padded width ``L`` (a pair too long is handled as a unit).
      flags: optional per-pair arrays ``[N]`` (e.g. safety flags), kept aligned with the
        pairs that survive ``on_too_long``.
      on_too_long: the over-long policy.

    Returns:
      ``chosen_{input_ids, attention_mask, response_mask, positions}``, the same four
      ``rejected_*`` keys, each ``[N, L]``, and every flag as an ``[N]`` array.
    """
    arrays, report = pad_preference_pairs(
        [render_prompt(p, tokenizer) for p in prompts],
        [render_response(text, tokenizer) for text in chosen],
        [render_response(text, tokenizer) for text in rejected],
        pad_id=tokenizer.pad_id,
        max_length=max_length,
        on_too_long=on_too_long,
    )
    for name, values in (flags or {}).items():
        values = np.asarray(values)
        if len(values) != len(prompts):
            raise ValueError(f"flag {name!r} has {len(values)} entries for {len(prompts)} pairs")
        arrays[name] = values[report.kept]
    return arrays


def prompt_arrays(
    prompts: Sequence[Sequence[Turn]],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    on_too_long: OnTooLong = "truncate",
) -> Arrays:
    """Left-padded generation prompts (each ends with the ``<assistant>`` marker).

    Returns:
      ``input_ids`` int32, ``attention_mask`` bool and ``positions`` int32, ``[N, P]``
      with ``P = max_length``; truncation keeps a prompt's last tokens.
    """
    arrays, _ = pad_prompts_left(
        [render_prompt(p, tokenizer) for p in prompts],
        pad_id=tokenizer.pad_id,
        max_length=max_length,
        on_too_long=on_too_long,
    )
    return arrays


def task_sft_arrays(
    examples: Sequence[SFTExample], tokenizer: Tokenizer, *, max_length: int
) -> Arrays:
    """:func:`sft_arrays` of the embedded task's demonstrations (``to_dialogue`` form)."""
    return sft_arrays(
        [to_dialogue(e.prompt, e.response) for e in examples], tokenizer, max_length=max_length
    )


def task_preference_arrays(
    pairs: Sequence[PreferencePair],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    label: PreferenceLabel = "better",
) -> Arrays:
    """:func:`preference_arrays` of the embedded task's pairs.

    With ``label="better"`` the chosen reply is the more helpful one
    (``better_response_id``); with ``label="safer"`` it is the more harmless one
    (``safer_response_id``), the layout a cost model learns from. Either way the arrays
    carry the safety flags ``chosen_is_safe`` and ``rejected_is_safe`` (bool ``[N]``) and
    the gold rewards and costs ``chosen_reward``, ``rejected_reward``, ``chosen_cost``,
    ``rejected_cost`` (float32 ``[N]``) for diagnostics.
    """
    if label not in ("better", "safer"):
        raise ValueError(f"label must be 'better' or 'safer', got {label!r}")
    first = np.asarray(
        [(p.better_response_id if label == "better" else p.safer_response_id) for p in pairs]
    )
    responses = np.asarray([(p.response_0, p.response_1) for p in pairs], dtype=object)
    safe = np.asarray([(p.is_response_0_safe, p.is_response_1_safe) for p in pairs], bool)
    rewards = np.asarray([(p.reward_0, p.reward_1) for p in pairs], np.float32)
    costs = np.asarray([(p.cost_0, p.cost_1) for p in pairs], np.float32)
    rows = np.arange(len(pairs))
    chosen, rejected = first, 1 - first
    return preference_arrays(
        [[("human", p.prompt)] for p in pairs],
        list(responses[rows, chosen]),
        list(responses[rows, rejected]),
        tokenizer,
        max_length=max_length,
        flags={
            "chosen_is_safe": safe[rows, chosen],
            "rejected_is_safe": safe[rows, rejected],
            "chosen_reward": rewards[rows, chosen],
            "rejected_reward": rewards[rows, rejected],
            "chosen_cost": costs[rows, chosen],
            "rejected_cost": costs[rows, rejected],
        },
    )


def task_prompt_arrays(
    prompts: Sequence[Prompt | str], tokenizer: Tokenizer, *, max_length: int
) -> Arrays:
    """:func:`prompt_arrays` of embedded-task prompts (objects or texts), one human turn each."""
    texts = [p if isinstance(p, str) else p.text for p in prompts]
    return prompt_arrays([[("human", t)] for t in texts], tokenizer, max_length=max_length)


def sequential_batches(arrays: Arrays, *, batch_size: int) -> Iterator[tuple[Arrays, int]]:
    """Fixed-shape batches in order for evaluation: ``(batch, number of real rows)``.

    The last batch is completed by repeating row 0, so every batch has ``batch_size`` rows
    (one compilation); the caller keeps the first ``number of real rows`` outputs.
    """
    size = len(next(iter(arrays.values())))
    if size == 0:
        raise ValueError("no examples to batch")
    for start in range(0, size, batch_size):
        index = np.arange(start, start + batch_size)
        valid = int(min(batch_size, size - start))
        index = np.where(index < size, index, 0)
        yield {k: v[index] for k, v in arrays.items()}, valid
