"""Batching: left-padded prompts, right-padded (prompt, response) rows and pairs, SFT
packing, length buckets and the over-long policy."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.data.batching import (
    bucket_length,
    default_buckets,
    pack_sequences,
    pad_preference_pairs,
    pad_prompt_responses,
    pad_prompts_left,
)
from rlhf_jax.data.errors import DataError

PAD = -1  # a pad id no real token uses, so padding is visible in assertions
RNG = np.random.default_rng(0)


def seqs(lengths, offset=0):
    return [np.arange(n, dtype=np.int32) + 100 * k + offset for k, n in enumerate(lengths)]


def test_buckets():
    assert default_buckets(100, 16) == (16, 32, 64, 100)
    assert default_buckets(64, 16) == (16, 32, 64)
    assert bucket_length(17, (16, 32, 64)) == 32
    assert bucket_length(16, (16, 32, 64)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_length(65, (16, 32, 64))


def test_left_padding_ends_every_prompt_at_the_last_column():
    prompts = seqs([3, 5, 1])
    arrays, report = pad_prompts_left(prompts, pad_id=PAD, max_length=8)
    assert arrays["input_ids"].shape == (3, 8)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        np.testing.assert_array_equal(arrays["input_ids"][row, 8 - n :], prompt)
        assert (arrays["input_ids"][row, : 8 - n] == PAD).all()
        assert arrays["attention_mask"][row].tolist() == [False] * (8 - n) + [True] * n
        assert arrays["positions"][row, 8 - n :].tolist() == list(range(n))
    assert report.kept.tolist() == [0, 1, 2] and (report.truncated, report.skipped) == (0, 0)


def test_left_padding_with_buckets_uses_the_smallest_fitting_width():
    arrays, _ = pad_prompts_left(seqs([3, 9]), pad_id=PAD, max_length=32, buckets=(4, 16, 32))
    assert arrays["input_ids"].shape == (2, 16)


@pytest.mark.parametrize("policy", ["truncate", "skip", "raise"])
def test_long_prompts_follow_the_policy(policy):
    prompts = seqs([3, 12, 4])
    if policy == "raise":
        with pytest.raises(DataError, match="example 1: too_long: 12 tokens > max_length 6"):
            pad_prompts_left(prompts, pad_id=PAD, max_length=6, on_too_long=policy)
        return
    arrays, report = pad_prompts_left(prompts, pad_id=PAD, max_length=6, on_too_long=policy)
    if policy == "truncate":
        np.testing.assert_array_equal(arrays["input_ids"][1], prompts[1][-6:])  # keeps the end
        assert report.kept.tolist() == [0, 1, 2] and report.truncated == 1
    else:
        assert report.kept.tolist() == [0, 2] and report.skipped == 1
        np.testing.assert_array_equal(arrays["input_ids"][1, 2:], prompts[2])


def check_right_padded(arrays, prompt, response, row):
    n, m = len(prompt), len(response)
    ids = arrays["input_ids"][row]
    np.testing.assert_array_equal(ids[: n + m], np.concatenate([prompt, response]))
    assert (ids[n + m :] == PAD).all()
    assert (
        arrays["attention_mask"][row].sum() == n + m
        and arrays["attention_mask"][row, : n + m].all()
    )
    assert arrays["response_mask"][row].tolist() == [False] * n + [True] * m + [False] * (
        len(ids) - n - m
    )
    assert arrays["positions"][row, : n + m].tolist() == list(range(n + m))


def test_right_padding_aligns_masks_with_tokens():
    prompts, responses = seqs([3, 1, 4]), seqs([2, 5, 1], offset=50)
    arrays, report = pad_prompt_responses(prompts, responses, pad_id=PAD, max_length=10)
    assert arrays["input_ids"].shape == (3, 10)
    for row in range(3):
        check_right_padded(arrays, prompts[row], responses[row], row)
    assert report.truncated == 0


def test_right_padding_truncates_response_then_prompt():
    prompts, responses = seqs([4, 9]), seqs([5, 3], offset=50)
    arrays, report = pad_prompt_responses(prompts, responses, pad_id=PAD, max_length=6)
    check_right_padded(arrays, prompts[0], responses[0][:2], 0)  # response cut at the end
    check_right_padded(arrays, prompts[1][-5:], responses[1][:1], 1)  # prompt keeps its end
    assert report.truncated == 2


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_right_padding_skip_and_raise(policy):
    prompts, responses = seqs([2, 2, 2]), seqs([1, 7, 2], offset=50)
    if policy == "raise":
        with pytest.raises(DataError, match="example 1"):
            pad_prompt_responses(prompts, responses, pad_id=PAD, max_length=5, on_too_long=policy)
        return
    arrays, report = pad_prompt_responses(
        prompts, responses, pad_id=PAD, max_length=5, on_too_long=policy
    )
    assert report.kept.tolist() == [0, 2] and report.skipped == 1
    check_right_padded(arrays, prompts[2], responses[2], 1)


def test_pairs_share_width_and_prompt():
    prompts, chosen, rejected = seqs([3, 2]), seqs([4, 1], 50), seqs([1, 6], 70)
    arrays, report = pad_preference_pairs(
        prompts, chosen, rejected, pad_id=PAD, max_length=16, buckets=(8, 16)
    )
    assert arrays["chosen_input_ids"].shape == arrays["rejected_input_ids"].shape == (2, 8)
    for row in range(2):
        check_right_padded(
            {k[7:]: v for k, v in arrays.items() if k.startswith("chosen_")},
            prompts[row],
            chosen[row],
            row,
        )
        check_right_padded(
            {k[9:]: v for k, v in arrays.items() if k.startswith("rejected_")},
            prompts[row],
            rejected[row],
            row,
        )
    assert report.kept.tolist() == [0, 1]


@pytest.mark.parametrize("policy", ["truncate", "skip", "raise"])
def test_pairs_are_cut_or_dropped_as_a_unit(policy):
    prompts, chosen, rejected = seqs([2, 2]), seqs([1, 2], 50), seqs([1, 9], 70)
    kwargs = {"pad_id": PAD, "max_length": 5, "on_too_long": policy}
    if policy == "raise":
        with pytest.raises(DataError, match="example 1: too_long: 11 tokens"):
            pad_preference_pairs(prompts, chosen, rejected, **kwargs)
        return
    arrays, report = pad_preference_pairs(prompts, chosen, rejected, **kwargs)
    if policy == "skip":
        assert report.kept.tolist() == [0] and report.skipped == 1
        assert arrays["chosen_input_ids"].shape == (1, 5)
    else:
        assert report.truncated == 1
        np.testing.assert_array_equal(
            arrays["chosen_input_ids"][1, :4], np.concatenate([prompts[1], chosen[1]])
        )
        np.testing.assert_array_equal(
            arrays["rejected_input_ids"][1], np.concatenate([prompts[1], rejected[1][:3]])
        )


def unpack(arrays):
    """Every segment of every row, as (ids, loss mask, positions)."""
    segments = []
    for row in range(arrays["input_ids"].shape[0]):
        seg = arrays["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = seg == s
            assert np.flatnonzero(where).tolist() == list(
                range(np.argmax(where), np.argmax(where) + where.sum())
            )
            segments.append(
                (
                    arrays["input_ids"][row, where],
                    arrays["loss_mask"][row, where],
                    arrays["positions"][row, where],
                )
            )
    return segments


def test_packing_keeps_every_sequence_intact_and_independent():
    lengths = [5, 3, 7, 2, 6, 1, 4]
    sequences = seqs(lengths)
    masks = [RNG.random(n) < 0.5 for n in lengths]
    arrays, report = pack_sequences(sequences, masks, row_length=8, pad_id=PAD)
    assert all(v.shape == arrays["input_ids"].shape for v in arrays.values())
    assert arrays["input_ids"].shape[1] == 8
    segments = unpack(arrays)
    by_first_token = {int(ids[0]): (ids, loss, pos) for ids, loss, pos in segments}
    assert len(segments) == len(sequences)
    for seq, mask in zip(sequences, masks, strict=True):
        ids, loss, pos = by_first_token[int(seq[0])]
        np.testing.assert_array_equal(ids, seq)
        np.testing.assert_array_equal(loss, mask)
        assert pos.tolist() == list(range(len(seq)))
    padding = arrays["segment_ids"] == 0
    assert (arrays["input_ids"][padding] == PAD).all() and not arrays["loss_mask"][padding].any()
    # First fit in input order: 5+3 | 7 | 2+6 ... ; 1 joins row 2 (7+1), 4 opens row 3.
    assert arrays["input_ids"].shape[0] == 4
    assert report.kept.tolist() == list(range(7))


@pytest.mark.parametrize("policy", ["truncate", "skip", "raise"])
def test_packing_long_sequences_follow_the_policy(policy):
    sequences = seqs([3, 11])
    masks = [np.ones(3, bool), np.arange(11) % 2 == 0]
    kwargs = {"row_length": 8, "pad_id": PAD, "on_too_long": policy}
    if policy == "raise":
        with pytest.raises(DataError, match="example 1: too_long: 11 tokens > max_length 8"):
            pack_sequences(sequences, masks, **kwargs)
        return
    arrays, report = pack_sequences(sequences, masks, **kwargs)
    segments = unpack(arrays)
    if policy == "skip":
        assert len(segments) == 1 and report.skipped == 1 and report.kept.tolist() == [0]
    else:
        ids, loss, _ = segments[1]
        np.testing.assert_array_equal(ids, sequences[1][:8])
        np.testing.assert_array_equal(loss, masks[1][:8])
        assert report.truncated == 1


def test_packing_to_a_fixed_number_of_rows():
    arrays, _ = pack_sequences(
        seqs([4, 4]), [np.ones(4, bool)] * 2, row_length=8, pad_id=PAD, num_rows=3
    )
    assert arrays["segment_ids"].tolist()[1:] == [[0] * 8, [0] * 8]
    with pytest.raises(ValueError, match="needs 2 rows but num_rows=1"):
        pack_sequences(seqs([5, 5]), [np.ones(5, bool)] * 2, row_length=8, pad_id=PAD, num_rows=1)


def test_batches_go_to_devices_with_a_data_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rows = len(jax.devices())
    arrays, _ = pad_preference_pairs(
        seqs([2] * rows), seqs([3] * rows, 50), seqs([1] * rows, 70), pad_id=0, max_length=8
    )
    sharded = jax.device_put(arrays, NamedSharding(mesh, PartitionSpec("data")))
    for key, value in sharded.items():
        np.testing.assert_array_equal(np.asarray(value), arrays[key])
        assert value.sharding.spec == PartitionSpec("data")
