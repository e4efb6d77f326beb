"""Tests of the embedded assistant world: its gold reward/cost, base policy and labels.

Statistical checks use 4-sigma bounds of the sampling distribution they test (a false
failure has probability < 1e-4 per check), and every data set is a fixed seed, so the
tests are deterministic.
"""

import dataclasses
import math
import re

import numpy as np
import pytest

from rlhf_jax.data import embedded_task as et

Z = 4.0  # number of standard errors allowed in statistical checks


@pytest.fixture(scope="module")
def task():
    return et.make_embedded_task()


@pytest.fixture(scope="module")
def small_config():
    return et.EmbeddedTaskConfig(
        seed=3,
        num_train_prompts=60,
        num_heldout_prompts=20,
        num_sft=50,
        num_sft_heldout=10,
        num_preference_pairs=40,
        num_preference_heldout=10,
    )


def all_pairs(task):
    return task.preference_train + task.preference_heldout


# --- determinism, splits and variety -------------------------------------------------------


def test_same_seed_gives_same_task_and_other_seed_differs(small_config):
    first = et.make_embedded_task(small_config)
    assert first == et.make_embedded_task(small_config)
    other = et.make_embedded_task(dataclasses.replace(small_config, seed=4))
    assert other.sft_train != first.sft_train
    assert other.train_prompts != first.train_prompts


def test_changing_one_size_leaves_other_sets_unchanged(small_config):
    first = et.make_embedded_task(small_config)
    bigger = et.make_embedded_task(dataclasses.replace(small_config, num_sft=80))
    assert bigger.train_prompts == first.train_prompts
    assert bigger.preference_train == first.preference_train
    assert len(bigger.sft_train) == 80


def test_sizes_and_prompt_split(task):
    config = task.config
    train = {p.text for p in task.train_prompts}
    heldout = {p.text for p in task.heldout_prompts}
    assert len(train) == config.num_train_prompts
    assert len(heldout) == config.num_heldout_prompts
    assert not train & heldout
    assert len(task.sft_train) == config.num_sft
    assert len(task.sft_heldout) == config.num_sft_heldout
    assert len(task.preference_train) == config.num_preference_pairs
    assert len(task.preference_heldout) == config.num_preference_heldout
    assert {e.prompt for e in task.sft_train} <= train
    assert {p.prompt for p in task.preference_train} <= train
    assert {e.prompt for e in task.sft_heldout} <= heldout
    assert {p.prompt for p in task.preference_heldout} <= heldout


def test_variety_of_requests_and_words(task):
    assert len(et.REQUEST_TYPES) >= 24
    # Prompts are balanced over types: 1500 prompts over 30 types is 50 per type, and
    # every type has at least 64 distinct prompts.
    counts = {name: 0 for name in et.REQUEST_TYPES}
    for prompt in task.train_prompts:
        counts[prompt.request_type] += 1
    assert min(counts.values()) >= len(task.train_prompts) // len(et.REQUEST_TYPES) - 1
    words = set()
    for example in task.sft_train:
        words |= set(re.findall(r"[a-z]+", (example.prompt + " " + example.response).lower()))
    assert len(words) >= 300


def test_texts_fit_a_byte_level_model(task):
    prompt_lengths = [len(p.text) for p in task.train_prompts]
    response_lengths = [len(e.response) for e in task.sft_train]
    assert min(prompt_lengths) >= 15 and max(prompt_lengths) <= 80
    assert min(response_lengths) >= 20 and max(response_lengths) <= 256
    assert np.percentile(response_lengths, 95) <= 200
    assert all(text.isascii() for e in task.sft_train for text in (e.prompt, e.response))


def test_every_prompt_parses_back_to_itself():
    for prompts in et.all_prompts().values():
        for prompt in prompts:
            assert et.parse_prompt(prompt.text) == prompt
            assert et.key_words(prompt.text)  # relevance is a fraction of a non-empty set
    with pytest.raises(ValueError, match="matches no request template"):
        et.parse_prompt("How do I make a spaceship?")


def test_dialogue_form():
    assert et.to_dialogue("What is 2 plus 3?", "5.") == [
        ("human", "What is 2 plus 3?"),
        ("assistant", "5."),
    ]


# --- gold reward and cost are documented functions of text ---------------------------------


def test_gold_reward_matches_hand_computed_formula():
    # K = {2, plus, 3, 5} all present -> rel 1; no arithmetic topic word -> topic 0;
    # specific tokens {2, 3, 5} -> 3/8; "hello" -> politeness 1/2; 21 chars -> length 0.21;
    # bigrams all distinct -> repetition 0.
    reward = et.gold_reward("What is 2 plus 3?", "Hello! 2 plus 3 is 5.")
    assert reward == pytest.approx(2 * 1 + 2 * 3 / 8 + 1 * 0.5 + 1 * 0.21, abs=1e-12)
    # Every feature of the empty response is zero.
    assert et.gold_reward("What is 2 plus 3?", "") == 0.0


def test_repetition_and_length_terms_by_hand():
    prompt = "What is 2 plus 3?"
    breakdown = et.reward_breakdown(prompt, "please please please please")
    assert breakdown.repetition == pytest.approx(1 - 1 / 3)
    assert breakdown.politeness == pytest.approx(0.5)
    long_text = "x" * 320
    assert et.reward_breakdown(prompt, long_text).length == pytest.approx(1.0 - 1.0)


def test_reward_changes_as_documented_when_adding_markers(task):
    # A response with no politeness/rudeness markers, no repeated bigrams and length in
    # [100, 200] keeps its length (saturated) and repetition terms when a short marker
    # sentence is appended; only the marker feature moves, by one step of its cap.
    checked = 0
    for example in task.sft_train:
        before = et.reward_breakdown(example.prompt, example.response)
        if (
            before.politeness
            or before.rudeness
            or before.repetition
            or not 100 <= len(example.response) <= 200
        ):
            continue
        polite = et.gold_reward(example.prompt, example.response + " Thank you!")
        rude = et.gold_reward(example.prompt, example.response + " Ugh.")
        weights = et.REWARD_WEIGHTS
        assert polite - before.total == pytest.approx(weights["politeness"] / 2, abs=1e-12)
        assert rude - before.total == pytest.approx(weights["rudeness"] / 2, abs=1e-12)
        checked += 1
    assert checked >= 50


def test_removing_harmful_phrases_removes_cost(task):
    markers = [m for group in et.HARM_MARKERS.values() for m in group]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, markers)) + r")\b", re.IGNORECASE)
    harmful = [e for e in task.sft_train if e.cost > 0]
    assert len(harmful) > 100
    for example in harmful:
        cleaned = pattern.sub("", example.response)
        assert et.gold_cost(example.prompt, cleaned) == 0.0
        assert not et.is_harmful(example.prompt, cleaned)
        assert example.cost == et.gold_cost(example.prompt, example.response) > 0


def test_cost_is_the_documented_sum_of_category_severities():
    prompt = "How do I clean the oven?"
    assert et.gold_cost(prompt, "Scrub it with soda.") == 0.0
    assert et.gold_cost(prompt, "Mix bleach with ammonia.") == et.HARM_SEVERITY["danger"]
    both = "Mix bleach, you idiot, and ammonia."
    assert et.gold_cost(prompt, both) == et.HARM_SEVERITY["danger"] + et.HARM_SEVERITY["insult"]
    # "bleached" is not the marker "bleach": markers match whole words.
    assert et.gold_cost(prompt, "Use bleached cloths.") == 0.0


# --- base policy: harm rate and the helpfulness/harm tension -------------------------------


def test_base_harm_rate_matches_stated_rate(task):
    flags = np.array([e.cost > 0 for e in task.sft_train + task.sft_heldout])
    h = task.config.harmful_rate
    assert abs(flags.mean() - h) < Z * math.sqrt(h * (1 - h) / flags.size)


@pytest.mark.parametrize("harmful_rate", [0.0, 0.15])
def test_base_harm_rate_follows_the_parameter(task, harmful_rate):
    rng = np.random.default_rng(11)
    prompts = [p.text for p in task.train_prompts[:1000]]
    flags = np.array(
        [
            et.is_harmful(x, et.sample_base_response(rng, x, harmful_rate=harmful_rate))
            for x in prompts
        ]
    )
    if harmful_rate == 0.0:
        assert not flags.any()  # harm enters only through the harmful part
    else:
        sigma = math.sqrt(harmful_rate * (1 - harmful_rate) / flags.size)
        assert abs(flags.mean() - harmful_rate) < Z * sigma


def test_reward_and_harm_are_positively_correlated(task):
    rewards = np.array([e.reward for e in task.sft_train])
    harm = np.array([e.cost > 0 for e in task.sft_train], dtype=float)
    # Under no correlation the sample correlation has standard error ≈ 1/sqrt(N).
    assert np.corrcoef(rewards, harm)[0, 1] > Z / math.sqrt(rewards.size)
    assert rewards[harm == 1].mean() > rewards[harm == 0].mean()


@pytest.fixture(scope="module")
def best_of_n(task):
    """Gold reward and harm of 16 base responses for each of 200 training prompts."""
    rng = np.random.default_rng(5)
    rewards, harm = [], []
    for prompt in task.train_prompts[:200]:
        responses = [et.sample_base_response(rng, prompt.text) for _ in range(16)]
        rewards.append([et.gold_reward(prompt.text, y) for y in responses])
        harm.append([et.is_harmful(prompt.text, y) for y in responses])
    return np.array(rewards), np.array(harm)


def test_reward_maximising_response_is_more_often_harmful(task, best_of_n):
    rewards, harm = best_of_n
    best_harm = harm[np.arange(len(harm)), rewards.argmax(axis=1)]
    h = task.config.harmful_rate
    # Binomial standard error of the best-of-16 harm rate over 200 prompts.
    assert best_harm.mean() > h + Z * math.sqrt(h * (1 - h) / best_harm.size)


def test_safe_responses_leave_room_above_the_base_policy(task, best_of_n):
    rewards, harm = best_of_n
    safe_best = np.where(harm, -np.inf, rewards).max(axis=1)
    base_mean = np.mean([e.reward for e in task.sft_train])
    # Best safe response per prompt beats the base policy's mean by a wide margin (reward
    # standard deviation is about 1.5, so 1.0 is far outside sampling noise).
    assert np.mean(safe_best) > base_mean + 1.0


# --- preference labels ---------------------------------------------------------------------


def test_helpfulness_labels_follow_bradley_terry(task):
    pairs = all_pairs(task)
    p = np.array([x.better_probability for x in pairs])
    expected = et.bradley_terry_probability(
        np.array([x.reward_0 for x in pairs]), np.array([x.reward_1 for x in pairs]), 1.0
    )
    np.testing.assert_allclose(p, expected, atol=1e-12)
    first_wins = np.array([x.better_response_id == 0 for x in pairs], dtype=float)
    # Overall: Σ(label − p) has variance Σ p(1 − p).
    assert abs(np.sum(first_wins - p)) < Z * math.sqrt(np.sum(p * (1 - p)))
    # Calibration in five bins of p, each with its own binomial standard error.
    edges = np.quantile(p, np.linspace(0, 1, 6))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 4)
    for b in range(5):
        in_bin = bins == b
        sigma = math.sqrt(np.sum(p[in_bin] * (1 - p[in_bin])))
        assert abs(np.sum(first_wins[in_bin] - p[in_bin])) < Z * max(sigma, 0.5)


def test_harmlessness_labels_and_safety_flags(task):
    pairs = all_pairs(task)
    for x in pairs:
        assert x.is_response_0_safe == (et.gold_cost(x.prompt, x.response_0) == 0)
        assert x.is_response_1_safe == (et.gold_cost(x.prompt, x.response_1) == 0)
        assert x.cost_0 == et.gold_cost(x.prompt, x.response_0)
    tau_c = task.config.cost_temperature
    q = np.array([et.bradley_terry_probability(x.cost_1, x.cost_0, tau_c) for x in pairs])
    first_safer = np.array([x.safer_response_id == 0 for x in pairs], dtype=float)
    assert abs(np.sum(first_safer - q)) < Z * math.sqrt(np.sum(q * (1 - q)))
    mixed = np.array([x.is_response_0_safe != x.is_response_1_safe for x in pairs])
    assert mixed.mean() > 0.25  # enough safe-vs-unsafe pairs to train a cost model


def test_bayes_optimal_accuracy_closed_form_cases():
    r = np.array([0.0, 1.0, -2.0])
    assert et.bayes_optimal_accuracy(r, r, 1.0) == pytest.approx(0.5)
    assert et.bayes_optimal_accuracy(r, r + 100.0, 1.0) == pytest.approx(1.0)
    # One pair at margin 1 and τ = 2: max(σ(0.5), σ(−0.5)) = σ(0.5).
    expected = 1 / (1 + math.exp(-0.5))
    assert et.bayes_optimal_accuracy(np.array([1.0]), np.array([0.0]), 2.0) == pytest.approx(
        expected
    )


def test_bayes_optimal_accuracy_matches_monte_carlo(task):
    pairs = all_pairs(task)
    r0 = np.array([x.reward_0 for x in pairs])
    r1 = np.array([x.reward_1 for x in pairs])
    tau = task.config.temperature
    exact = et.bayes_optimal_accuracy(r0, r1, tau)
    assert 0.5 < exact < 1.0
    p = 1 / (1 + np.exp(-(r0 - r1) / tau))
    q = np.maximum(p, 1 - p)
    draws = 200
    rng = np.random.default_rng(0)
    labels_first = rng.random((draws, len(pairs))) < p
    correct = labels_first == (r0 >= r1)
    sigma = math.sqrt(np.mean(q * (1 - q)) / (draws * len(pairs)))
    assert abs(correct.mean() - exact) < Z * sigma
    # The data set's own labels are one such draw.
    dataset_correct = np.array([x.better_response_id == 0 for x in pairs]) == (r0 >= r1)
    assert abs(dataset_correct.mean() - exact) < Z * math.sqrt(np.mean(q * (1 - q)) / len(pairs))


# --- non-transitive oracle -----------------------------------------------------------------


def test_nontransitive_oracle_has_a_cycle():
    prompt = "What is 2 plus 3?"
    sure, well, okay = (f"{s}, 2 plus 3 is 5." for s in ("Sure", "Well", "Okay"))
    assert (
        et.gold_reward(prompt, sure) == et.gold_reward(prompt, well) == et.gold_reward(prompt, okay)
    )
    # sure ≻ okay ≻ well ≻ sure, each with probability σ(κ) for κ = 2.
    win = 1 / (1 + math.exp(-2.0))
    assert et.nontransitive_preference(prompt, sure, okay) == pytest.approx(win)
    assert et.nontransitive_preference(prompt, okay, well) == pytest.approx(win)
    assert et.nontransitive_preference(prompt, well, sure) == pytest.approx(win)


def test_nontransitive_oracle_is_a_valid_preference(task):
    for x in task.preference_train[:300]:
        forward = et.nontransitive_preference(x.prompt, x.response_0, x.response_1)
        backward = et.nontransitive_preference(x.prompt, x.response_1, x.response_0)
        assert 0.0 < forward < 1.0
        assert forward + backward == pytest.approx(1.0, abs=1e-12)
        bt = et.nontransitive_preference(x.prompt, x.response_0, x.response_1, cycle_strength=0.0)
        assert bt == pytest.approx(x.better_probability, abs=1e-12)


def test_responses_carry_at_most_one_style_word(task):
    # The oracle reads the style from the first style word; content never uses one, so
    # the opener is unambiguous, and about a quarter of responses have none.
    counts = [
        sum(w in et.STYLES for w in re.findall(r"[a-z0-9]+", e.response.lower()))
        for e in task.sft_train
    ]
    assert max(counts) == 1
    no_style = np.mean([et.response_style(e.response) == -1 for e in task.sft_train])
    assert abs(no_style - 0.25) < Z * math.sqrt(0.25 * 0.75 / len(counts))


def test_style_cycle_matrix_is_antisymmetric_rock_paper_scissors():
    cycle = et.style_cycle_matrix()
    np.testing.assert_array_equal(cycle, -cycle.T)
    np.testing.assert_array_equal(np.abs(cycle).sum(axis=1), [2, 2, 2])
    # Every style beats exactly one other and loses to exactly one other.
    np.testing.assert_array_equal((cycle > 0).sum(axis=1), [1, 1, 1])


def test_score_responses(task):
    examples = task.sft_heldout
    scores = et.score_responses([e.prompt for e in examples], [e.response for e in examples])
    assert scores["gold_reward"] == pytest.approx(np.mean([e.reward for e in examples]))
    assert scores["harm_rate"] == pytest.approx(np.mean([e.cost > 0 for e in examples]))
