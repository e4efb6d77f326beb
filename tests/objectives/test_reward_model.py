import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import reward_model
from rlhf_jax.tabular import core
from rlhf_jax.tabular import preference_optima as po

# Float32 L-BFGS on exact population losses: the curvature of the loss in every
# identifiable direction is ≥ ~1e-2 here, so the final gradient (~1e-6) leaves errors
# ~1e-4 in the scores; 1e-3 leaves an order of magnitude of slack.
ATOL = 1e-3


def bt_per_pair(**hyper):
    def single(chosen, rejected, _ref_chosen, _ref_rejected):
        return reward_model.bradley_terry_loss(
            chosen[None], rejected[None], reduction="sum", **hyper
        )[0]

    return jax.vmap(single)


def score_population(per_pair, weights, pair_arrays=()):
    zeros = jnp.zeros(weights.shape[:2])
    return lambda scores: po.pairwise_population_loss(per_pair, scores, zeros, weights, pair_arrays)


def test_bradley_terry_recovers_the_reward_up_to_a_constant():
    task = core.make_task(jax.random.PRNGKey(0), num_prompts=3, num_responses=5)
    # Pairs from the reference policy μ = π_ref, labels from P = σ(r − r').
    weights = po.pair_weights(task.prompt_probs, task.ref_logp, task.preference)
    population = score_population(bt_per_pair(), weights)
    scores = core.minimise(population, jnp.zeros_like(task.reward))
    np.testing.assert_allclose(po.centred(scores), po.centred(task.reward), atol=ATOL)


def test_margin_and_label_smoothing_reach_their_closed_form():
    p = jnp.array([0.3, 0.75, 0.95])
    task = core.make_task(jax.random.PRNGKey(1), num_prompts=3, num_responses=2)
    preference = core.bradley_terry_preference(jnp.stack([jax.scipy.special.logit(p), 0 * p], -1))
    weights = po.pair_weights(task.prompt_probs, task.ref_logp, preference)
    cases = [(0.5, 0.0), (0.0, 0.1), (0.5, 0.1)]
    populations = [
        score_population(bt_per_pair(margin=m, label_smoothing=eps), weights) for m, eps in cases
    ]

    def total(stacked):
        return sum(f(stacked[k]) for k, f in enumerate(populations))

    found = core.minimise(total, jnp.zeros((len(cases), 3, 2)))
    for k, (m, eps) in enumerate(cases):
        expected = po.bradley_terry_optimal_difference(p, m, eps)
        np.testing.assert_allclose(found[k, :, 0] - found[k, :, 1], expected, atol=ATOL)
        # The margin pushes the optimum outward and smoothing pulls it in, as the form says.
        if m > 0 and eps == 0:
            assert bool(jnp.all(jnp.abs(expected) > jnp.abs(jax.scipy.special.logit(p))))


def test_bradley_terry_metrics_jit_and_vmap():
    key1, key2 = jax.random.split(jax.random.PRNGKey(2))
    chosen, rejected = jax.random.normal(key1, (6,)), jax.random.normal(key2, (6,))
    loss, metrics = jax.jit(reward_model.bradley_terry_loss)(chosen, rejected)
    d = np.asarray(chosen - rejected, np.float64)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-d))), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(d > 0))
    np.testing.assert_allclose(metrics["denominator"], 6.0)
    grouped, _ = jax.vmap(reward_model.bradley_terry_loss)(
        chosen.reshape(2, 3), rejected.reshape(2, 3)
    )
    np.testing.assert_allclose(
        grouped, [np.mean(np.log1p(np.exp(-d[:3]))), np.mean(np.log1p(np.exp(-d[3:])))], rtol=1e-5
    )


# ---------------------------------------------------------------- Safe-RLHF cost model

COST = jnp.array([[-1.5, -0.4, 0.6, 1.7], [-0.8, 0.3, 1.2, -2.0]])


def cost_population(sign_weight):
    unsafe = (COST > 0).astype(jnp.float32)
    harm_preference = core.bradley_terry_preference(COST)  # P(y more harmful than y')
    weights = po.pair_weights(
        jnp.full((2,), 0.5), jnp.zeros_like(COST) - jnp.log(4.0), harm_preference
    )
    unsafe_w, unsafe_l = (
        jnp.broadcast_to(unsafe[:, :, None], weights.shape),
        jnp.broadcast_to(unsafe[:, None, :], weights.shape),
    )

    def single(c_w, c_l, _rw, _rl, u_w, u_l):
        return reward_model.cost_model_loss(
            c_w[None],
            c_l[None],
            u_w[None] > 0,
            u_l[None] > 0,
            sign_weight=sign_weight,
            reduction="sum",
        )[0]

    return score_population(jax.vmap(single), weights, (unsafe_w, unsafe_l))


def test_cost_model_recovers_cost_and_sign_term_puts_safe_responses_below_zero():
    preference_only, with_sign = cost_population(0.0), cost_population(1.0)
    found = core.minimise(
        lambda stacked: preference_only(stacked[0]) + with_sign(stacked[1]),
        jnp.zeros((2, *COST.shape)),
    )
    # Preference term alone: the cost up to a per-prompt constant.
    np.testing.assert_allclose(po.centred(found[0]), po.centred(COST), atol=ATOL)
    # With the sign term: unsafe (c > 0) above zero, safe below, harm ordering kept.
    np.testing.assert_array_equal(jnp.sign(found[1]), jnp.sign(COST))
    np.testing.assert_array_equal(jnp.argsort(found[1], axis=-1), jnp.argsort(COST, axis=-1))
    _, metrics = reward_model.cost_model_loss(
        found[1][:, 3], found[1][:, 0], found[1][:, 3] > 0, found[1][:, 0] > 0
    )
    np.testing.assert_allclose(metrics["sign_accuracy"], 1.0)


def test_cost_model_loss_matches_a_direct_computation_jits_and_vmaps():
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    c_w, c_l = jax.random.normal(keys[0], (6,)), jax.random.normal(keys[1], (6,))
    unsafe_w = jnp.array([True, True, False, True, False, True])
    unsafe_l = jnp.array([False, True, False, False, False, True])
    loss, metrics = jax.jit(reward_model.cost_model_loss)(c_w, c_l, unsafe_w, unsafe_l)
    s_w, s_l = np.where(unsafe_w, 1.0, -1.0), np.where(unsafe_l, 1.0, -1.0)
    cw, cl = np.asarray(c_w, np.float64), np.asarray(c_l, np.float64)
    softplus = lambda z: np.log1p(np.exp(z))  # noqa: E731
    expected = softplus(-(cw - cl)) + softplus(-s_w * cw) + softplus(-s_l * cl)
    # float32 vs float64 on O(1) values: rtol 1e-5.
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["sign_accuracy"], np.mean([s_w * cw > 0, s_l * cl > 0]))
    grouped, _ = jax.vmap(reward_model.cost_model_loss)(
        *(a.reshape(2, 3) for a in (c_w, c_l, unsafe_w, unsafe_l))
    )
    np.testing.assert_allclose(grouped, expected.reshape(2, 3).mean(-1), rtol=1e-5)
