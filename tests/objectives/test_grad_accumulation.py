"""Eight micro-batches of one accumulate to exactly the update of one batch of eight.

Each micro-batch uses ``reduction="sum"``; the sums of losses and gradients are divided by
the whole batch's denominator (the sum of the micro-batch denominators). The policy
log-probs depend on a shared parameter vector, so the gradients of all micro-batches mix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import listwise, modpo, pairwise, sft, unpaired

B, D, T = 8, 3, 5
KEYS = jax.random.split(jax.random.PRNGKey(0), 8)
PARAMS = jax.random.normal(KEYS[0], (D,))
FEATURES = jax.random.normal(KEYS[1], (2, B, D))
REF = -jnp.abs(jax.random.normal(KEYS[2], (2, B))) * 3 - 1
LENGTHS = jax.random.randint(KEYS[3], (2, B), 1, 12).astype(jnp.float32)
MARGIN_REWARDS = jax.random.normal(KEYS[4], (2, B, 2))
LABELS = jnp.array([True, False, True, True, False, True, False, False])
TOKEN_FEATURES = jax.random.normal(KEYS[5], (B, T, D))
TOKEN_MASK = (jax.random.uniform(KEYS[6], (B, T)) > 0.3).astype(jnp.float32).at[:, 0].set(1.0)
KL_POLICY, KL_REF = -jnp.abs(jax.random.normal(KEYS[7], (2, B))) * 3 - 0.5


def policy_logps(params):
    # Per-sequence log-probs of chosen and rejected responses, [2, B], smooth in params.
    return -jax.nn.softplus(FEATURES @ params) * LENGTHS / 4


def pairwise_case(name):
    def loss(params, idx, reduction):
        pol = policy_logps(params)[:, idx]
        return pairwise.PAIRWISE_LOSSES[name](
            pol[0],
            pol[1],
            REF[0, idx],
            REF[1, idx],
            chosen_lengths=LENGTHS[0, idx],
            rejected_lengths=LENGTHS[1, idx],
            reduction=reduction,
        )

    return loss


def ipo_length_normalised(params, idx, reduction):
    pol = policy_logps(params)[:, idx]
    return pairwise.ipo_loss(
        pol[0],
        pol[1],
        REF[0, idx],
        REF[1, idx],
        chosen_lengths=LENGTHS[0, idx],
        rejected_lengths=LENGTHS[1, idx],
        length_normalise=True,
        reduction=reduction,
    )


def modpo_case(params, idx, reduction):
    pol = policy_logps(params)[:, idx]
    return modpo.modpo_loss(
        pol[0],
        pol[1],
        REF[0, idx],
        REF[1, idx],
        MARGIN_REWARDS[0, idx],
        MARGIN_REWARDS[1, idx],
        margin_weights=jnp.array([0.3, 0.2]),
        preference_weight=0.5,
        reduction=reduction,
    )


def kto_case(params, idx, reduction):
    # The reference point uses the whole batch's KL log-probs in every micro-batch.
    pol = policy_logps(params)[0, idx]
    return unpaired.kto_loss(pol, REF[0, idx], LABELS[idx], KL_POLICY, KL_REF, reduction=reduction)


def lipo_case(params, idx, reduction):
    pol = policy_logps(params)[:, idx].T  # lists of two, [b, 2]
    labels = jnp.broadcast_to(jnp.array([1.0, 0.0]), pol.shape)
    return listwise.lipo_lambda_loss(pol, REF[:, idx].T, labels, reduction=reduction)


def sft_case(normalisation):
    def loss(params, idx, reduction):
        token_logps = -jax.nn.softplus(TOKEN_FEATURES[idx] @ params)
        return sft.sft_loss(
            token_logps, TOKEN_MASK[idx], normalisation=normalisation, reduction=reduction
        )

    return loss


BATCH_COUPLED = {"aot_pair"}  # sorts across the batch: not decomposable by construction
CASES = {
    **{name: pairwise_case(name) for name in sorted(set(pairwise.PAIRWISE_LOSSES) - BATCH_COUPLED)},
    "ipo_length_normalised": ipo_length_normalised,
    "modpo": modpo_case,
    "kto": kto_case,
    "lipo_lambda": lipo_case,
    "sft_token": sft_case("token"),
    "sft_sequence": sft_case("sequence"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_eight_micro_batches_of_one_equal_one_batch_of_eight(name):
    loss_fn = CASES[name]
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnames="reduction")
    (full_loss, _), full_grad = value_and_grad(PARAMS, jnp.arange(B), reduction="mean")
    total, grad_total, denominator = 0.0, jnp.zeros(D), 0.0
    for i in range(B):
        (loss, metrics), grad = value_and_grad(PARAMS, jnp.arange(i, i + 1), reduction="sum")
        total, grad_total = total + loss, grad_total + grad
        denominator = denominator + metrics["denominator"]
    # float32 sums of 8 terms in different orders: agreement to ~1e-6 relative.
    np.testing.assert_allclose(total / denominator, full_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_total / denominator, full_grad, rtol=1e-4, atol=1e-7)


def test_sft_token_denominator_is_the_token_count():
    _, metrics = sft_case("token")(PARAMS, jnp.arange(B), "sum")
    np.testing.assert_allclose(metrics["denominator"], jnp.sum(TOKEN_MASK))
