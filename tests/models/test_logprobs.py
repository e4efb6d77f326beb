import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from scipy.special import log_softmax

from rlhf_jax.models import (
    ModelConfig,
    load_hf_model,
    response_logprobs,
    sequence_logprobs,
    token_logprobs,
)


def test_token_logprobs_is_a_gather_of_log_softmax():
    rng = np.random.RandomState(0)
    logits = 10 * rng.randn(3, 5, 11).astype(np.float32)
    targets = rng.randint(0, 11, (3, 5))
    expected = np.take_along_axis(
        log_softmax(logits.astype(np.float64), -1), targets[..., None], -1
    )
    # float32 logsumexp of O(10) logits: relative error ~1e-7, absolute ~1e-5 at worst.
    np.testing.assert_allclose(token_logprobs(logits, targets), expected[..., 0], atol=1e-5)
    bf16 = token_logprobs(jnp.asarray(logits, jnp.bfloat16), targets)
    assert bf16.dtype == jnp.float32


def test_response_logprobs_are_aligned_with_tokens():
    rng = np.random.RandomState(1)
    B, L, V = 2, 7, 9
    logits = rng.randn(B, L, V).astype(np.float32)
    tokens = rng.randint(0, V, (B, L))
    response_mask = np.zeros((B, L), np.int32)
    response_mask[0, 3:6] = 1  # prompt 0..2, response 3..5, pad 6
    response_mask[1, :4] = 1  # a mask set at t = 0 still gives 0 there: nothing predicts it
    per_token, per_sequence = response_logprobs(logits, tokens, response_mask)
    log_probs = log_softmax(logits.astype(np.float64), -1)
    expected = np.zeros((B, L))
    for b in range(B):
        for t in range(1, L):
            if response_mask[b, t]:
                expected[b, t] = log_probs[b, t - 1, tokens[b, t]]
    np.testing.assert_allclose(per_token, expected, atol=1e-5)
    np.testing.assert_allclose(per_sequence, expected.sum(1), atol=1e-5)


def test_sequence_logprobs_in_a_pure_step_is_padding_invariant_and_differentiable(
    make_noisy_decoder,
):
    config = ModelConfig.gpt2(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2)
    graphdef, params = nnx.split(make_noisy_decoder(config), nnx.Param)
    rng = np.random.RandomState(2)
    prompt, response = rng.randint(1, 50, 3), rng.randint(1, 50, 4)
    tokens = np.zeros((2, 10), np.int32)
    tokens[0, :7] = np.concatenate([prompt, response])  # right-padded
    tokens[1, 3:] = np.concatenate([prompt, response])  # left-padded
    attention_mask = tokens != 0
    response_mask = np.zeros((2, 10), np.int32)
    response_mask[0, 3:7] = response_mask[1, 6:10] = 1

    @jax.jit
    def step(params, tokens, attention_mask, response_mask):
        def total(params):
            model = nnx.merge(graphdef, params)
            _, per_sequence = sequence_logprobs(model, tokens, attention_mask, response_mask)
            return per_sequence.sum(), per_sequence

        return jax.value_and_grad(total, has_aux=True)(params)

    (_, per_sequence), grads = step(params, tokens, attention_mask, response_mask)
    # Same prompt and response, padded on either side: same log-probability (f32 ulps).
    np.testing.assert_allclose(per_sequence[0], per_sequence[1], atol=1e-5)
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    assert jnp.isfinite(grad_norm) and grad_norm > 0


def test_sequence_logprobs_match_transformers(hf_models):
    hf_model, directory = hf_models["qwen2"]
    model = load_hf_model(directory)
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, 128, (2, 8)).astype(np.int32)
    attention_mask = np.ones((2, 8), np.int32)
    response_mask = np.zeros((2, 8), np.int32)
    response_mask[:, 5:] = 1
    per_token, per_sequence = jax.jit(sequence_logprobs)(
        model, tokens, attention_mask, response_mask
    )
    with torch.no_grad():
        logits = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.double()
    reference = torch.log_softmax(logits, -1)[:, :-1].gather(
        -1, torch.tensor(tokens[:, 1:, None], dtype=torch.long)
    )
    reference = np.pad(reference[..., 0].numpy(), ((0, 0), (1, 0))) * response_mask
    # As for the logits parity: float32 on both sides, 1e-4 covers summation order.
    np.testing.assert_allclose(per_token, reference, atol=1e-4)
    np.testing.assert_allclose(per_sequence, reference.sum(1), atol=1e-4)
