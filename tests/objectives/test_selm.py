import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import pairwise, selm

BETA, ALPHA = 0.5, 0.2


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    return [-jnp.abs(2.0 * jax.random.normal(k, (5,))) - 0.1 for k in keys]


def call(batch, alpha, reduction="mean"):
    pc, pr, rc, rr, pe, re = batch
    return selm.selm_loss(
        pc,
        pr,
        rc,
        rr,
        policy_explore_logps=pe,
        ref_explore_logps=re,
        beta=BETA,
        alpha=alpha,
        reduction=reduction,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_alpha_zero_is_dpo_exactly(batch, reduction):
    ours, metrics = call(batch, 0.0, reduction)
    dpo, dpo_metrics = pairwise.dpo_loss(*batch[:4], beta=BETA, reduction=reduction)
    np.testing.assert_allclose(ours, dpo, rtol=1e-7)
    for key, value in dpo_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-7)


def test_optimism_term_value_and_gradient_direction(batch):
    pc, pr, rc, rr, pe, re = batch
    loss, _ = call(batch, ALPHA)
    dpo, _ = pairwise.dpo_loss(pc, pr, rc, rr, beta=BETA)
    # the extra term is α β mean(log π(y_ref) − log π_ref(y_ref))
    np.testing.assert_allclose(loss - dpo, ALPHA * BETA * np.mean(pe - re), rtol=1e-5)
    grads = jax.grad(lambda *a: call(a, ALPHA)[0], argnums=(0, 4))(*batch)
    dpo_grad_chosen = jax.grad(lambda p: pairwise.dpo_loss(p, pr, rc, rr, beta=BETA)[0])(pc)
    # The optimism gradient on the explored responses is +αβ/B per sample: a descent step
    # lowers the likelihood of what π_ref would say (exploring away from it); the DPO part
    # of the gradient is untouched.
    np.testing.assert_allclose(grads[1], np.full(5, ALPHA * BETA / 5), rtol=1e-6)
    np.testing.assert_allclose(grads[0], dpo_grad_chosen, rtol=1e-6)
