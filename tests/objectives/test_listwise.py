import itertools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import listwise, pairwise, reward_model
from rlhf_jax.tabular import core
from rlhf_jax.tabular import preference_optima as po

# Parity checks compare float32 objectives with float64 numpy on O(1) values through a
# handful of ops: rtol 1e-5 (1e-6 where both sides are float32 and the same operations).


def test_plackett_luce_with_two_responses_is_bradley_terry():
    scores = jax.random.normal(jax.random.PRNGKey(0), (7, 2))
    pl, _ = listwise.plackett_luce_loss(scores)
    bt, _ = reward_model.bradley_terry_loss(scores[:, 0], scores[:, 1])
    np.testing.assert_allclose(pl, bt, rtol=1e-6)


def test_plackett_luce_matches_a_direct_likelihood():
    scores = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 4)), np.float64)
    loss, metrics = jax.jit(listwise.plackett_luce_loss)(jnp.asarray(scores, jnp.float32))
    expected = 0.0
    for row in scores:
        expected -= sum(row[i] - np.log(np.sum(np.exp(row[i:]))) for i in range(4))
    np.testing.assert_allclose(loss, expected / 3, rtol=1e-5)
    np.testing.assert_allclose(metrics["denominator"], 3.0)
    grouped, _ = jax.vmap(listwise.plackett_luce_loss)(jnp.asarray(scores, jnp.float32)[:, None])
    np.testing.assert_allclose(jnp.mean(grouped), loss, rtol=1e-5)


def test_plackett_luce_recovers_the_reward_on_a_table():
    task = core.make_task(jax.random.PRNGKey(2), num_prompts=2, num_responses=4)
    rankings, probs = po.plackett_luce_rankings(task.reward)  # [24, 4], [X, 24]
    per_list = jax.vmap(
        jax.vmap(lambda s: listwise.plackett_luce_loss(s[None], reduction="sum")[0])
    )

    def population(scores):
        ranked = scores[:, rankings]  # [X, 24, 4]
        return jnp.sum(task.prompt_probs[:, None] * probs * per_list(ranked))

    found = core.minimise(population, jnp.zeros_like(task.reward))
    # Float32 L-BFGS; curvature ≥ ~5e-2 in every centred direction: errors ~1e-5.
    np.testing.assert_allclose(po.centred(found), po.centred(task.reward), atol=1e-3)


def random_lists(key, batch=3, size=5):
    k1, k2, k3 = jax.random.split(key, 3)
    policy = -jnp.abs(jax.random.normal(k1, (batch, size))) * 5
    ref = -jnp.abs(jax.random.normal(k2, (batch, size))) * 5
    labels = jax.random.randint(k3, (batch, size), 0, 4).astype(jnp.float32)
    return policy, ref, labels


def test_lambda_weights_match_a_direct_computation():
    policy, ref, labels = random_lists(jax.random.PRNGKey(3), batch=1, size=4)
    scores = np.asarray(0.1 * (policy - ref))[0]
    psi = np.asarray(labels)[0]
    rank = {item: position + 1 for position, item in enumerate(np.argsort(-scores))}
    expected = np.zeros((4, 4))
    for i, j in itertools.product(range(4), range(4)):
        gain = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1))
        discount = abs(1 / np.log2(1 + rank[i]) - 1 / np.log2(1 + rank[j]))
        expected[i, j] = gain * discount
    found = listwise.lambda_weights(jnp.asarray(scores), jnp.asarray(psi))
    np.testing.assert_allclose(found, expected, rtol=1e-5)


@jax.jit
def lipo_value_and_grad(policy, ref, labels):
    return jax.value_and_grad(lambda p: listwise.lipo_lambda_loss(p, ref, labels, beta=0.3)[0])(
        policy
    )


def test_lipo_lambda_for_lists_of_two_is_dpo_times_its_lambda_weight():
    policy, ref, _ = random_lists(jax.random.PRNGKey(4), batch=6, size=2)
    labels = jnp.tile(jnp.array([[1.0, 0.0]]), (6, 1))
    lipo, grad_lipo = lipo_value_and_grad(policy, ref, labels)
    dpo, grad_dpo = jax.jit(
        jax.value_and_grad(
            lambda p: pairwise.dpo_loss(p[:, 0], p[:, 1], ref[:, 0], ref[:, 1], beta=0.3)[0]
        )
    )(policy)
    # Δ = |G(1) − G(0)| · |1/log₂2 − 1/log₂3| whichever response is ranked first.
    weight = 1 - 1 / np.log2(3)
    np.testing.assert_allclose(lipo, weight * dpo, rtol=1e-5)
    np.testing.assert_allclose(grad_lipo, weight * grad_dpo, rtol=1e-5)


def test_lipo_lambda_is_invariant_to_list_order():
    policy, ref, labels = random_lists(jax.random.PRNGKey(5))
    perm = jnp.array([3, 0, 4, 2, 1])
    loss, grad = lipo_value_and_grad(policy, ref, labels)
    permuted_loss, permuted_grad = lipo_value_and_grad(
        policy[:, perm], ref[:, perm], labels[:, perm]
    )
    np.testing.assert_allclose(permuted_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(permuted_grad, grad[:, perm], rtol=1e-5, atol=1e-8)


def test_lipo_lambda_jits_and_vmaps():
    policy, ref, labels = random_lists(jax.random.PRNGKey(6), batch=4)
    loss, metrics = jax.jit(listwise.lipo_lambda_loss)(policy, ref, labels)
    grouped, _ = jax.vmap(listwise.lipo_lambda_loss)(
        policy.reshape(2, 2, 5), ref.reshape(2, 2, 5), labels.reshape(2, 2, 5)
    )
    # Each list's loss is independent of the others: the mean of group means is the mean.
    np.testing.assert_allclose(jnp.mean(grouped), loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["denominator"], 4.0)
