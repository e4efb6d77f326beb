import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import pairwise, rationale

BETA = 0.3


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    return [-jnp.abs(2.0 * jax.random.normal(k, (6,))) - 0.1 for k in keys]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_without_rationales_it_is_dpo(batch, reduction):
    dpo, _ = pairwise.dpo_loss(*batch[:4], beta=BETA, reduction=reduction)
    zero_weight, _ = rationale.rationale_dpo_loss(
        *batch[:4], rationale_logps=batch[4], rationale_weight=0.0, beta=BETA, reduction=reduction
    )
    empty_mask, _ = rationale.rationale_dpo_loss(
        *batch[:4],
        rationale_logps=jnp.full((6,), -jnp.inf),  # no rationale: log-prob meaningless
        has_rationale=jnp.zeros(6),
        beta=BETA,
        reduction=reduction,
    )
    np.testing.assert_allclose(zero_weight, dpo, rtol=1e-7)
    np.testing.assert_allclose(empty_mask, dpo, rtol=1e-7)


def test_rationale_term_is_the_weighted_masked_nll(batch):
    mask = jnp.array([1, 0, 1, 1, 0, 1], jnp.float32)
    lengths = jnp.array([4, 1, 7, 2, 3, 5], jnp.float32)
    gamma = 0.8
    dpo, _ = pairwise.dpo_loss(*batch[:4], beta=BETA)
    loss, metrics = rationale.rationale_dpo_loss(
        *batch[:4],
        rationale_logps=batch[4],
        has_rationale=mask,
        beta=BETA,
        rationale_weight=gamma,
    )
    r, m = np.asarray(batch[4], np.float64), np.asarray(mask)
    np.testing.assert_allclose(loss - dpo, gamma * np.sum(-r * m) / 6, rtol=1e-5)
    np.testing.assert_allclose(metrics["rationale_nll"], np.sum(-r * m) / 4, rtol=1e-6)
    per_token, _ = rationale.rationale_dpo_loss(
        *batch[:4],
        rationale_logps=batch[4],
        has_rationale=mask,
        rationale_lengths=lengths,
        beta=BETA,
        rationale_weight=gamma,
        reduction="sum",
    )
    dpo_sum, _ = pairwise.dpo_loss(*batch[:4], beta=BETA, reduction="sum")
    np.testing.assert_allclose(per_token - dpo_sum, gamma * np.sum(-r * m / lengths), rtol=1e-5)
    # the rationale term's gradient w.r.t. its log-prob is −γ m / B: it raises the
    # likelihood of the rationales and leaves pairs without one alone
    grad = jax.grad(
        lambda lp: rationale.rationale_dpo_loss(
            *batch[:4], rationale_logps=lp, has_rationale=mask, beta=BETA, rationale_weight=gamma
        )[0]
    )(batch[4])
    np.testing.assert_allclose(grad, -gamma * m / 6, rtol=1e-6)
