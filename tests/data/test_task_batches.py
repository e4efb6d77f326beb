import numpy as np
import pytest

from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import EmbeddedTaskConfig, make_embedded_task
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.train.loop import EpochPermutationSchedule

TOKENIZER = ByteTokenizer()
MAX_LENGTH = 320  # longer than every rendered example of the embedded task (~290 at most)


@pytest.fixture(scope="module")
def task():
    return make_embedded_task(
        EmbeddedTaskConfig(
            num_train_prompts=40,
            num_heldout_prompts=10,
            num_sft=24,
            num_sft_heldout=6,
            num_preference_pairs=24,
            num_preference_heldout=6,
        )
    )


def test_sft_loss_mask_decodes_back_to_the_response(task):
    arrays = task_batches.task_sft_arrays(task.sft_train, TOKENIZER, max_length=MAX_LENGTH)
    assert {k: v.shape for k, v in arrays.items()} == {
        k: (24, MAX_LENGTH) for k in ("input_ids", "attention_mask", "loss_mask", "positions")
    }
    for row, example in enumerate(task.sft_train):
        ids, mask = arrays["input_ids"][row], arrays["loss_mask"][row]
        assert TOKENIZER.decode(ids[mask]) == example.response
        assert ids[mask][-1] == TOKENIZER.eos_id  # the reply's eos is learnt too
        real = arrays["attention_mask"][row]
        assert not np.any(mask & ~real)
        np.testing.assert_array_equal(arrays["positions"][row][real], np.arange(real.sum()))


def test_multi_turn_loss_mask_covers_every_assistant_turn():
    dialogue = [("human", "hi"), ("assistant", "hello"), ("human", "and?"), ("assistant", "bye")]
    arrays = task_batches.sft_arrays([dialogue], TOKENIZER, max_length=40)
    ids, mask = arrays["input_ids"][0], arrays["loss_mask"][0]
    assert TOKENIZER.decode(ids[mask]) == "hellobye"
    assert np.sum(ids[mask] == TOKENIZER.eos_id) == 2
    truncated = task_batches.sft_arrays([dialogue], TOKENIZER, max_length=8)
    assert truncated["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match=r"dialogue 0: .* > max_length 8"):
        task_batches.sft_arrays([dialogue], TOKENIZER, max_length=8, on_too_long="raise")


def test_packed_rows_keep_each_dialogue_in_its_own_segment():
    dialogues = [[("human", "q"), ("assistant", text)] for text in ("a", "bb", "ccc")]
    arrays = task_batches.packed_sft_arrays(dialogues, TOKENIZER, row_length=32)
    assert arrays["input_ids"].shape == (1, 32)
    np.testing.assert_array_equal(arrays["attention_mask"], arrays["segment_ids"] > 0)
    for segment, text in enumerate(("a", "bb", "ccc"), start=1):
        inside = arrays["segment_ids"][0] == segment
        assert TOKENIZER.decode(arrays["input_ids"][0][inside & arrays["loss_mask"][0]]) == text
        assert arrays["positions"][0][inside][0] == 0


@pytest.mark.parametrize("label", ["better", "safer"])
def test_preference_rows_decode_to_the_labelled_responses(task, label):
    pairs = task.preference_train
    arrays = task_batches.task_preference_arrays(
        pairs, TOKENIZER, max_length=MAX_LENGTH, label=label
    )
    for row, pair in enumerate(pairs):
        first = pair.better_response_id if label == "better" else pair.safer_response_id
        responses = (pair.response_0, pair.response_1)
        safe = (pair.is_response_0_safe, pair.is_response_1_safe)
        for side, index in (("chosen", first), ("rejected", 1 - first)):
            ids = arrays[f"{side}_input_ids"][row]
            assert TOKENIZER.decode(ids[arrays[f"{side}_response_mask"][row]]) == responses[index]
            assert arrays[f"{side}_is_safe"][row] == safe[index]
        prompt = ~arrays["chosen_response_mask"][row] & arrays["chosen_attention_mask"][row]
        assert TOKENIZER.decode(arrays["chosen_input_ids"][row][prompt]) == pair.prompt
        rejected_prompt = arrays["rejected_input_ids"][row][: prompt.sum()]
        np.testing.assert_array_equal(arrays["chosen_input_ids"][row][prompt], rejected_prompt)
    assert all(v.shape[0] == len(pairs) for v in arrays.values())
    assert arrays["chosen_input_ids"].shape == (len(pairs), MAX_LENGTH)


def test_flags_follow_the_pairs_that_are_kept():
    prompts = [[("human", "q")]] * 3
    chosen, rejected = ["short", "x" * 50, "fine"], ["no", "no", "nope"]
    arrays = task_batches.preference_arrays(
        prompts,
        chosen,
        rejected,
        TOKENIZER,
        max_length=16,
        flags={"chosen_is_safe": [True, False, False]},
        on_too_long="skip",
    )
    # Pair 1 is too long and dropped as a unit; the flags of pairs 0 and 2 remain.
    np.testing.assert_array_equal(arrays["chosen_is_safe"], [True, False])
    assert TOKENIZER.decode(arrays["chosen_input_ids"][1][arrays["chosen_response_mask"][1]]) == (
        "fine"
    )


def test_prompts_are_left_padded_and_end_with_the_assistant_marker(task):
    arrays = task_batches.task_prompt_arrays(task.heldout_prompts, TOKENIZER, max_length=80)
    assert arrays["input_ids"].shape == (len(task.heldout_prompts), 80)
    assert np.all(arrays["attention_mask"][:, -1])
    assert np.all(arrays["input_ids"][:, -1] == TOKENIZER.role_ids["assistant"])
    for row, prompt in enumerate(task.heldout_prompts):
        assert TOKENIZER.decode(arrays["input_ids"][row][arrays["attention_mask"][row]]) == (
            prompt.text
        )


def test_epoch_order_is_a_function_of_seed_and_step(task):
    arrays = task_batches.task_sft_arrays(task.sft_train, TOKENIZER, max_length=MAX_LENGTH)
    arrays["row"] = np.arange(len(task.sft_train))
    schedule = EpochPermutationSchedule(arrays, batch_size=8, seed=3)
    first_run = [schedule.batch_for_step(t)["row"] for t in range(7)]
    # One epoch (3 batches of 8) visits every example once, and each epoch reshuffles.
    assert sorted(np.concatenate(first_run[:3])) == list(range(24))
    assert not np.array_equal(np.concatenate(first_run[:3]), np.concatenate(first_run[3:6]))
    # A fresh schedule (a resumed run) started at step 5 reads what the first run read.
    resumed = EpochPermutationSchedule(arrays, batch_size=8, seed=3)
    np.testing.assert_array_equal(resumed.batch_for_step(5)["row"], first_run[5])
    assert all(resumed.batch_for_step(5)[k].shape[0] == 8 for k in arrays)
    other_seed = EpochPermutationSchedule(arrays, batch_size=8, seed=4)
    assert not np.array_equal(other_seed.batch_for_step(0)["row"], first_run[0])


def test_sequential_batches_have_one_shape_and_cover_every_row_once():
    arrays = {"row": np.arange(10), "x": np.ones((10, 3))}
    batches = list(task_batches.sequential_batches(arrays, batch_size=4))
    assert [valid for _, valid in batches] == [4, 4, 2]
    assert all(batch["x"].shape == (4, 3) for batch, _ in batches)
    kept = np.concatenate([batch["row"][:valid] for batch, valid in batches])
    np.testing.assert_array_equal(kept, np.arange(10))
