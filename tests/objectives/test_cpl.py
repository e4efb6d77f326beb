import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import cpl, pairwise
from rlhf_jax.tabular import core
from rlhf_jax.tabular import mdp as tm

ALPHA = 0.5


def logistic(z):
    return -jax.nn.log_sigmoid(z)


# ------------------------------------------------------------------ formula and DPO mapping


def test_cpl_formula_with_discount_mask_and_conservative_bias():
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    chosen = -jnp.abs(jax.random.normal(keys[0], (4, 3)))
    rejected = -jnp.abs(jax.random.normal(keys[1], (4, 3)))
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], jnp.float32)
    rejected = jnp.where(mask > 0, rejected, -jnp.inf)  # padding may be non-finite
    loss, metrics = cpl.cpl_loss(
        chosen, rejected, mask, mask, alpha=ALPHA, discount=0.9, conservative_bias=0.7
    )
    c, r, m = (np.asarray(a, np.float64) for a in (chosen, rejected, mask))
    g = 0.9 ** np.arange(3)
    s_c = ALPHA * np.sum(g * c * m, -1)
    s_r = ALPHA * np.sum(np.where(m > 0, g * r, 0.0), -1)
    expected = np.mean(np.log1p(np.exp(-(s_c - 0.7 * s_r))))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["denominator"] == 4


def test_one_step_cpl_is_dpo_with_beta_alpha():
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    chosen, rejected, ref_chosen, ref_rejected = (
        -jnp.abs(jax.random.normal(k, (6,))) for k in keys
    )
    uniform = jnp.full((6,), -jnp.log(4.0))
    for reduction in ("mean", "sum"):
        kw = dict(alpha=ALPHA, discount=0.3, reduction=reduction)
        # MaxEnt CPL: DPO against a uniform reference
        maxent, _ = cpl.cpl_loss(chosen[:, None], rejected[:, None], **kw)
        dpo_uniform, _ = pairwise.dpo_loss(
            chosen, rejected, uniform, uniform, beta=ALPHA, reduction=reduction
        )
        np.testing.assert_allclose(maxent, dpo_uniform, rtol=1e-6)
        # with reference log-probs: DPO against that reference
        regularised, _ = cpl.cpl_loss(
            chosen[:, None],
            rejected[:, None],
            ref_chosen_logps=ref_chosen[:, None],
            ref_rejected_logps=ref_rejected[:, None],
            **kw,
        )
        dpo, _ = pairwise.dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=ALPHA, reduction=reduction
        )
        np.testing.assert_allclose(regularised, dpo, rtol=1e-6)


def test_conservative_bias_pushes_mass_off_actions_absent_from_the_data():
    """One state, three actions; the comparisons only involve actions 0 and 1. With λ = 1
    the loss depends on log π(0) − log π(1) alone (flat in the out-of-distribution logit);
    with λ < 1 its gradient on that logit is positive, so descent lowers π(2): §3.2."""
    chosen, rejected = jnp.array([[0], [1], [0]]), jnp.array([[1], [0], [1]])

    def loss(logits, bias):
        logp = jax.nn.log_softmax(logits)
        return cpl.cpl_loss(logp[chosen], logp[rejected], alpha=ALPHA, conservative_bias=bias)[0]

    logits = jnp.array([0.3, -0.2, 0.5])
    plain = jax.grad(loss)(logits, 1.0)
    conservative = jax.grad(loss)(logits, 0.5)
    np.testing.assert_allclose(plain[2], 0.0, atol=1e-7)
    assert conservative[2] > 1e-3, conservative


# ------------------------------------------------------------- CPL recovers the MaxEnt optimum


def test_cpl_population_minimiser_is_the_maxent_optimal_policy():
    world = tm.make_mdp(jax.random.PRNGKey(2), num_states=3, num_actions=2, discount=0.8)
    behaviour = jnp.log(jnp.full((3, 2), 0.5))
    states, actions, probs = tm.enumerate_segments(world, 2, behaviour)
    n = probs.shape[0]
    first, second = jnp.repeat(jnp.arange(n), n), jnp.tile(jnp.arange(n), n)

    @jax.jit  # one compilation for labels, population loss and L-BFGS
    def fit():
        advantages = tm.optimal_advantages(world, temperature=ALPHA)
        pair_probs = probs[first] * probs[second]
        regret = tm.segment_sums(advantages, states, actions, world.discount)
        label = cpl.regret_preference(regret[first, None], regret[second, None])

        def population(logits):
            steps = core.log_policy(logits)[states, actions]  # [N, L]
            a, b = steps[first], steps[second]
            kw = dict(alpha=ALPHA, discount=world.discount, reduction="sum")
            forward, _ = cpl.cpl_loss(a, b, weights=pair_probs * label, **kw)
            backward, _ = cpl.cpl_loss(b, a, weights=pair_probs * (1 - label), **kw)
            return forward + backward

        return core.log_policy(core.minimise(population, jnp.zeros((3, 2)))), advantages

    fitted, advantages = fit()
    # L-BFGS on a smooth population loss with curvature ~α²·(pair weight) ≥ 1e-2 per
    # identifiable direction: gradient 1e-6 leaves ~1e-4 error; 1e-3 gives 10x slack.
    np.testing.assert_allclose(fitted, advantages / ALPHA, atol=1e-3)


# --------------------------------------------- regret vs partial return (Knox et al., 2022)

TERMINAL = 2
CONTINUE, QUIT, LOITER = 0, 1, 2


def quit_or_continue(reward_nonterminal):
    """States 0, 1 alternate on CONTINUE; QUIT ends in the absorbing state 2 (reward 0);
    LOITER stays put. ``reward_nonterminal`` is the [2, 3] reward of states 0 and 1."""
    P = np.zeros((3, 3, 3), np.float32)
    P[0, CONTINUE, 1] = P[1, CONTINUE, 0] = 1.0
    P[0, QUIT, TERMINAL] = P[1, QUIT, TERMINAL] = 1.0
    P[0, LOITER, 0] = P[1, LOITER, 1] = 1.0
    P[TERMINAL, :, TERMINAL] = 1.0
    reward = jnp.concatenate([reward_nonterminal, jnp.zeros((1, 3))])
    return tm.TabularMDP(transitions=jnp.asarray(P), reward=reward, discount=0.9)


KNOX_TEMPERATURE = 0.1
# value iteration inside the fit: γ^200 = 0.9^200 ≈ 7e-10 times max|Q| ≤ 30 is negligible
KNOX_ITERATIONS = 200
TRUE_REWARD = jnp.array([[-0.1, 0.0, -3.0], [-0.1, 0.0, -3.0]])


@pytest.fixture(scope="module")
def one_step_comparisons():
    """All pairs of one-step segments from the non-terminal states, labelled by regret."""
    s, a = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    s, a = s.reshape(-1), a.reshape(-1)
    first, second = np.repeat(np.arange(6), 6), np.tile(np.arange(6), 6)
    adv = tm.optimal_advantages(quit_or_continue(TRUE_REWARD), temperature=KNOX_TEMPERATURE)
    label = cpl.regret_preference(adv[s, a][first, None], adv[s, a][second, None])
    return s, a, first, second, label, adv


def cross_entropy(predicted, label):
    return jnp.sum(-(label * jnp.log(predicted) + (1 - label) * jnp.log1p(-predicted)))


def test_regret_learning_recovers_the_optimal_policy_where_partial_return_does_not(
    one_step_comparisons,
):
    s, a, first, second, label, true_adv = one_step_comparisons

    def partial_return_loss(reward):
        r = reward.reshape(-1)
        return cross_entropy(cpl.partial_return_preference(r[first, None], r[second, None]), label)

    def regret_loss(reward):
        adv = tm.optimal_advantages(
            quit_or_continue(reward), temperature=KNOX_TEMPERATURE, iterations=KNOX_ITERATIONS
        )
        return cross_entropy(
            cpl.regret_preference(adv[s, a][first, None], adv[s, a][second, None]), label
        )

    @jax.jit  # one compilation for both fits and the learned advantages
    def fit():
        zeros = jnp.zeros((2, 3))
        partial = core.minimise(partial_return_loss, zeros)
        regret = core.minimise(regret_loss, zeros)
        learned = tm.optimal_advantages(quit_or_continue(regret), temperature=KNOX_TEMPERATURE)
        return partial, regret, learned

    partial, regret, learned_adv = fit()

    # Regret model: the learned reward has the true optimal advantages (so the same
    # MaxEnt-optimal policy, and the same greedy policy: QUIT). L-BFGS tolerance as above.
    np.testing.assert_allclose(learned_adv[:2], true_adv[:2], atol=1e-3)
    true_q, _ = tm.optimal_q(quit_or_continue(TRUE_REWARD))
    learned_q, _ = tm.optimal_q(quit_or_continue(regret))
    np.testing.assert_array_equal(jnp.argmax(learned_q[:2], -1), [QUIT, QUIT])
    np.testing.assert_array_equal(jnp.argmax(true_q[:2], -1), [QUIT, QUIT])

    # Partial-return model: the fit is A* up to a constant it cannot identify (its loss is
    # exactly invariant to a shift; from zero it keeps mean 0, i.e. shift −mean A*) ...
    np.testing.assert_allclose(partial, true_adv[:2] - jnp.mean(true_adv[:2]), atol=1e-3)
    for shift in (-1.0, 2.0):
        np.testing.assert_allclose(
            partial_return_loss(partial + shift), partial_return_loss(partial), rtol=1e-6
        )
    # ... and the shifted reward, positive on CONTINUE, makes the agent never QUIT.
    partial_q, _ = tm.optimal_q(quit_or_continue(partial))
    np.testing.assert_array_equal(jnp.argmax(partial_q[:2], -1), [CONTINUE, CONTINUE])
