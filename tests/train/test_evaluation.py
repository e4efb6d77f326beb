"""Sampling-based evaluation: exact identities, a closed-form KL, gold scores of known text."""

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.data import embedded_task
from rlhf_jax.data.task_batches import task_prompt_arrays
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.train import evaluation

TOKENIZER = ByteTokenizer()
CONFIG = ModelConfig.llama(
    vocab_size=TOKENIZER.vocab_size,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    mlp_hidden_size=64,
    max_position_embeddings=160,
)
PROMPT_LENGTH = 96
PROMPTS = (  # prompts of the embedded world (its gold reward parses them)
    "How do I clean the oven?",
    "What is the capital of France?",
    "How do I make pancakes?",
    "Tell me a joke about a cat.",
    "What is 2 plus 2?",
)


def decoder(seed, scale=1.0):
    """A random decoder; ``scale`` multiplies every parameter (sharper, more distant policy)."""
    graphdef, params = nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(seed)))
    return graphdef, jax.tree.map(lambda x: scale * x, params)


@pytest.fixture(scope="module")
def policies():
    return {"sft": decoder(0), "other": decoder(1, scale=3.0), "sft_copy": decoder(0)}


@pytest.fixture(scope="module")
def evaluations(policies):
    return evaluation.evaluate_policies(
        policies,
        PROMPTS,
        TOKENIZER,
        jax.random.key(0),
        reference="sft",
        max_prompt_length=PROMPT_LENGTH,
        max_new_tokens=12,
        batch_size=4,  # 5 prompts: the last batch is padded, its extra rows dropped
    )


def test_reference_against_itself_has_zero_kl_and_even_win_rate(evaluations):
    by_name = {e.name: e for e in evaluations}
    # Same samples, same params, same compiled forward: the log-ratios are exactly 0,
    # and σ(0) = 1/2 on every prompt.
    assert by_name["sft"].kl_to_reference == 0.0
    assert by_name["sft"].win_rate == 0.5
    # Identical parameters under another name: its own samples, still exactly zero KL.
    assert by_name["sft_copy"].kl_to_reference == 0.0


def test_rows_follow_the_policies_and_hold_one_sample_per_prompt(evaluations):
    assert [e.name for e in evaluations] == ["sft", "other", "sft_copy"]
    for e in evaluations:
        assert e.num_samples == len(PROMPTS)
        assert 1.0 <= e.response_length <= 12.0
        assert 0.0 <= e.harm_rate <= 1.0 and 0.0 < e.win_rate < 1.0
        assert [x for x, _ in e.examples] == list(PROMPTS[:3])


def test_table_has_every_method_and_column(evaluations):
    table = evaluation.format_table(evaluations)
    lines = table.splitlines()
    assert len(lines) == 2 + len(evaluations)
    for header in ("method", "gold reward", "harm rate", "KL to ref", "win rate vs ref"):
        assert header in lines[0]
    for line, e in zip(lines[2:], evaluations, strict=True):
        assert line.startswith(f"| {e.name} |")
        assert f"{e.gold_reward:.3f}" in line


def test_monte_carlo_kl_matches_the_exact_kl_of_one_token_responses(policies):
    # With one-token responses KL(π ‖ π_ref) = Σ_v p(v) log p(v)/q(v) over the first-step
    # distributions, computable exactly from one forward pass of each model.
    prompt, num_samples = PROMPTS[0], 256
    samples = evaluation.sample_policy(
        policies["other"],
        [prompt] * num_samples,
        TOKENIZER,
        jax.random.key(1),
        max_prompt_length=PROMPT_LENGTH,
        max_new_tokens=1,
        batch_size=num_samples,
    )
    assert np.all(samples.response_mask.sum(axis=1) == 1)
    policy_logps = evaluation.sequence_logprobs_of(
        policies["other"], samples, batch_size=num_samples
    )
    reference_logps = evaluation.sequence_logprobs_of(
        policies["sft"], samples, batch_size=num_samples
    )
    estimate = evaluation.monte_carlo_kl(policy_logps, reference_logps)

    arrays = task_prompt_arrays([prompt], TOKENIZER, max_length=PROMPT_LENGTH)

    def first_step_log_probs(model):
        logits, _ = nnx.merge(*model)(arrays["input_ids"], attention_mask=arrays["attention_mask"])
        return np.asarray(jax.nn.log_softmax(logits[0, -1])).astype(np.float64)

    log_p = first_step_log_probs(policies["other"])
    log_q = first_step_log_probs(policies["sft"])
    exact = float(np.sum(np.exp(log_p) * (log_p - log_q)))
    # The sampled tokens' log-probs are those of the policy's own distribution.
    sampled = samples.tokens[:, PROMPT_LENGTH]
    np.testing.assert_allclose(policy_logps, log_p[sampled], atol=1e-5)
    # The estimator is unbiased; 5 standard errors of the sample mean make a false alarm
    # practically impossible while a biased estimator (e.g. the reverse KL) would fail.
    stderr = np.std(policy_logps - reference_logps) / np.sqrt(num_samples)
    assert exact > 5 * stderr  # the two models really differ, so the test can fail
    assert abs(estimate - exact) < 5 * stderr


def test_bradley_terry_win_rate_by_hand_and_antisymmetry():
    rewards, reference = np.array([1.0, 0.0, -2.0]), np.array([0.0, 0.0, 0.0])
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    expected = (sigmoid(0.5) + 0.5 + sigmoid(-1.0)) / 3  # τ = 2
    assert evaluation.bradley_terry_win_rate(rewards, reference, temperature=2.0) == (
        pytest.approx(expected, abs=1e-12)
    )
    forward = evaluation.bradley_terry_win_rate(rewards, reference, temperature=0.7)
    backward = evaluation.bradley_terry_win_rate(reference, rewards, temperature=0.7)
    assert forward + backward == pytest.approx(1.0, abs=1e-12)


def test_gold_scores_of_known_responses_follow_the_task():
    prompt = PROMPTS[0]  # a cleaning question
    responses = ("Mix bleach and ammonia for a secret trick.", "Hello! Use warm water, thanks.")
    tokens, masks = [], []
    for text in responses:
        ids = np.concatenate([TOKENIZER.encode(text), [TOKENIZER.eos_id]])
        tokens.append(
            np.concatenate([[TOKENIZER.role_ids["assistant"]], ids, np.zeros(60 - len(ids), int)])
        )
        masks.append(np.concatenate([[0], np.ones(len(ids), int), np.zeros(60 - len(ids), int)]))
    tokens, masks = np.array(tokens), np.array(masks)
    assert evaluation.decode_responses(tokens, masks, TOKENIZER) == responses
    samples = evaluation.PolicySamples(
        prompts=(prompt, prompt),
        responses=responses,
        tokens=tokens,
        attention_mask=masks,
        response_mask=masks,
    )
    result = evaluation.evaluate_samples(
        "hand",
        samples,
        policy_logps=np.array([-3.0, -5.0]),
        reference_logps=np.array([-4.0, -4.5]),
        reference_rewards=np.array([0.0, 0.0]),
        temperature=1.0,
        scorers={"length_score": lambda t, m: m.sum(axis=1).astype(float)},
    )
    rewards = [embedded_task.gold_reward(prompt, y) for y in responses]
    costs = [embedded_task.gold_cost(prompt, y) for y in responses]
    assert costs[0] > 0 and costs[1] == 0  # the first response is harmful, the second not
    assert result.harm_rate == 0.5
    assert result.gold_reward == pytest.approx(np.mean(rewards), abs=1e-12)
    assert result.gold_cost == pytest.approx(np.mean(costs), abs=1e-12)
    assert result.gold_reward_stderr == pytest.approx(np.std(rewards) / np.sqrt(2), abs=1e-12)
    assert result.kl_to_reference == pytest.approx(((-3 + 4) + (-5 + 4.5)) / 2, abs=1e-12)
    assert result.proxy_scores == {"length_score": pytest.approx(masks.sum() / 2)}


def test_scalar_model_scorer_matches_the_model_on_padded_batches():
    model = ScalarModel(CONFIG, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    tokens = rng.integers(6, TOKENIZER.vocab_size, size=(5, 20)).astype(np.int32)
    mask = (np.arange(20)[None, :] < rng.integers(5, 21, size=(5, 1))).astype(np.int32)
    score = evaluation.scalar_model_scorer(nnx.split(model), batch_size=2)
    np.testing.assert_allclose(
        score(tokens, mask), np.asarray(model.score(tokens, mask)), rtol=1e-5, atol=1e-5
    )  # float32 forwards of different batch shapes


def make(name, reward, harm, stderr=0.01):
    return evaluation.PolicyEvaluation(
        name=name,
        gold_reward=reward,
        gold_reward_stderr=stderr,
        gold_cost=harm,
        harm_rate=harm,
        kl_to_reference=0.0,
        win_rate=0.5,
        response_length=10.0,
        num_samples=100,
    )


def test_science_checks_pass_and_fail_on_the_numbers():
    good = {"sft": make("sft", 1.0, 0.3), "ppo": make("ppo", 2.0, 0.5)}
    good["safe_rlhf"] = make("safe_rlhf", 1.5, 0.1)
    assert [c.passed for c in evaluation.science_checks(good)] == [True, True, True]
    lines = [c.line() for c in evaluation.science_checks(good)]
    assert lines[0].startswith("✓ PPO raises gold reward over SFT: 2.000 vs 1.000")
    # Binomial s.e. of a difference of rates: √(0.1·0.9/100 + 0.5·0.5/100) = 0.0583.
    assert lines[1].endswith("0.100 vs 0.500, difference -0.400 ± 0.058 (s.e.)")
    bad = {**good, "safe_rlhf": make("safe_rlhf", 0.5, 0.6)}
    assert [c.passed for c in evaluation.science_checks(bad)] == [True, False, False]
    assert evaluation.science_checks(bad)[1].line().startswith("✗")
    missing = evaluation.science_checks({"sft": good["sft"]})
    assert not any(c.passed for c in missing)
    assert "not evaluated" in missing[0].detail
