import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import nash
from rlhf_jax.objectives.pairwise import ipo_loss
from rlhf_jax.tabular import core, games


@pytest.fixture(scope="module")
def table():
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    X, Y = 2, 4
    upper = jnp.triu(jax.random.uniform(keys[0], (X, Y, Y)), 1)
    preference = upper + jnp.swapaxes(jnp.triu(1.0 - upper, 1), -1, -2) + 0.5 * jnp.eye(Y)
    policy_logp = core.log_policy(jax.random.normal(keys[1], (X, Y)))
    ref_logp = core.log_policy(jax.random.normal(keys[2], (X, Y)))
    return policy_logp, ref_logp, preference


def test_geometric_mixture_is_the_normalised_product(table):
    policy_logp, ref_logp, _ = table
    beta = 0.3
    product = jnp.exp(policy_logp) ** (1 - beta) * jnp.exp(ref_logp) ** beta
    explicit = product / jnp.sum(product, axis=-1, keepdims=True)
    mixture = nash.geometric_mixture_logp(policy_logp, ref_logp, beta=beta)
    np.testing.assert_allclose(jnp.exp(mixture), explicit, rtol=1e-5)
    # Along another axis (e.g. [V, B] layouts) and under vmap.
    np.testing.assert_allclose(
        nash.geometric_mixture_logp(policy_logp.T, ref_logp.T, beta=beta, axis=0),
        mixture.T,
        atol=1e-6,
    )
    vmapped = jax.vmap(lambda p, r: nash.geometric_mixture_logp(p, r, beta=beta))(
        policy_logp, ref_logp
    )
    np.testing.assert_allclose(vmapped, mixture, atol=1e-6)
    # Endpoints: β = 0 is π, β = 1 is μ.
    np.testing.assert_allclose(
        nash.geometric_mixture_logp(policy_logp, ref_logp, beta=0.0), policy_logp, atol=1e-6
    )
    np.testing.assert_allclose(
        nash.geometric_mixture_logp(policy_logp, ref_logp, beta=1.0), ref_logp, atol=1e-6
    )


def test_nash_md_step_is_the_mirror_descent_argmax(table):
    # Munos et al. (2023), Nash-MD: π_{t+1} = argmax_π η P(π ≻ π^μ_t) − KL(π ‖ π^μ_t), whose
    # maximiser is core's Gibbs optimum with "reward" η P(y ≻ π^μ_t) and β = 1.
    policy_logp, ref_logp, preference = table
    eta, tau = 0.5, 0.4
    mixture = nash.geometric_mixture_logp(policy_logp, ref_logp, beta=eta * tau)
    payoff = core.preference_against(preference, mixture)
    expected = core.kl_regularised_optimum(mixture, eta * payoff, 1.0)
    np.testing.assert_allclose(
        nash.nash_md_step(policy_logp, ref_logp, preference, eta=eta, tau=tau), expected, atol=1e-5
    )


def test_proximal_and_nash_mp_steps_are_the_proximal_argmaxes(table):
    # Both Nash-MP steps maximise η[⟨π, payoff⟩ − β KL(π‖μ)] − KL(π‖π_k), strictly concave in
    # π, so the closed form is right iff the objective's gradient in the logits vanishes
    # there (float32 zero: ~1e-6 on O(1) terms), while it does not at the prox centre.
    policy_logp, ref_logp, preference = table
    eta, beta = 1.5, 0.3
    full, half = nash.nash_mp_step(policy_logp, ref_logp, preference, eta=eta, beta=beta)

    @jax.jit
    def gradient(logits, payoff):
        def objective(lg):
            logp = core.log_policy(lg)
            value = eta * (core.expected(logp, payoff) - beta * core.kl(logp, ref_logp))
            return jnp.sum(value - core.kl(logp, policy_logp))

        return jax.grad(objective)(logits)

    first_payoff = core.preference_against(preference, policy_logp)
    second_payoff = core.preference_against(preference, half)
    assert float(jnp.max(jnp.abs(gradient(half, first_payoff)))) < 1e-5
    assert float(jnp.max(jnp.abs(gradient(full, second_payoff)))) < 1e-5
    assert float(jnp.max(jnp.abs(gradient(policy_logp, first_payoff)))) > 1e-2


def test_inpo_population_loss_is_minimised_by_the_mirror_descent_step(table):
    # Zhang et al. (2024): minimising INPO's loss over pairs y, y' ∼ π_t (exact weights,
    # soft labels P(y ≻ y')) gives π_{t+1} ∝ π_t^{1−ητ} μ^{ητ} exp(η P(y ≻ π_t)).
    # Solved independently with L-BFGS (reaches ~1e-5 in log-probs on this smooth table).
    anchor_logp, ref_logp, preference = table
    eta, tau = 0.8, 0.5
    X, Y = anchor_logp.shape
    pair_weights = core.pair_probs(anchor_logp).reshape(-1)

    def flat_first(t):
        return jnp.broadcast_to(t[:, :, None], (X, Y, Y)).reshape(-1)

    def flat_second(t):
        return jnp.broadcast_to(t[:, None, :], (X, Y, Y)).reshape(-1)

    def population(logits):
        logp = core.log_policy(logits)
        loss, _ = nash.inpo_loss(
            flat_first(logp),
            flat_second(logp),
            flat_first(anchor_logp),
            flat_second(anchor_logp),
            flat_first(ref_logp),
            flat_second(ref_logp),
            eta=eta,
            tau=tau,
            preference_probs=preference.reshape(-1),
            weights=pair_weights,
            reduction="sum",
        )
        return loss

    found = core.log_policy(core.minimise(population, jnp.zeros_like(anchor_logp)))
    np.testing.assert_allclose(
        found, nash.inpo_step(anchor_logp, ref_logp, preference, eta=eta, tau=tau), atol=1e-4
    )


def test_inpo_hard_label_is_the_chosen_rejected_form():
    key = jax.random.split(jax.random.PRNGKey(5), 6)
    args = [jax.random.normal(k, (7,)) for k in key]
    hard, _ = nash.inpo_loss(*args, eta=0.3, tau=1.0)
    soft, _ = nash.inpo_loss(*args, eta=0.3, tau=1.0, preference_probs=jnp.ones(7))
    np.testing.assert_allclose(hard, soft, rtol=1e-6)
    # By hand: h = Δlogπ − ητ Δlogμ − (1−ητ) Δlogπ_t, loss = mean (h − η/2)².
    h = (args[0] - args[1]) - 0.3 * (args[4] - args[5]) - 0.7 * (args[2] - args[3])
    np.testing.assert_allclose(hard, jnp.mean((h - 0.15) ** 2), rtol=1e-5)


def _pairs(logp, opponent_logp, preference, x):
    """All (y, y') pairs of prompt x with their probability under π(y) π_opp(y')."""
    Y = logp.shape[-1]
    y, y_opp = jnp.meshgrid(jnp.arange(Y), jnp.arange(Y), indexing="ij")
    y, y_opp = y.reshape(-1), y_opp.reshape(-1)
    weights = jnp.exp(logp[x, y] + opponent_logp[x, y_opp])
    return y, preference[x, y, y_opp], jax.lax.stop_gradient(weights)


def test_nash_md_pg_loss_gradient_is_the_exact_policy_gradient(table):
    # Munos et al. (2023), Nash-MD-PG: E_{y∼π, y'∼π^μ_β}[∇log π(y)(P(y≻y') − ½ − τ log π(y)/μ(y))]
    # = ∇_θ [P(π_θ ≻ π^μ_β) − τ KL(π_θ ‖ μ)] with the mixture held fixed.
    logits = jax.random.normal(jax.random.PRNGKey(7), (4,))
    _, ref_logp, preference = table
    x, tau, beta = 0, 0.3, 0.25
    ref = ref_logp[x]
    opponent = jax.lax.stop_gradient(
        nash.geometric_mixture_logp(jax.nn.log_softmax(logits), ref, beta=beta)
    )

    def surrogate(lg):
        logp = jax.nn.log_softmax(lg)
        y, prefs, weights = _pairs(logp[None], opponent[None], preference, x)
        loss, _ = nash.nash_md_pg_loss(
            logp[y], ref[y], prefs, tau=tau, weights=weights, reduction="sum"
        )
        return loss

    def objective(lg):
        logp = jax.nn.log_softmax(lg)
        win = jnp.exp(logp) @ preference[x] @ jnp.exp(opponent)
        return win - tau * jnp.sum(jnp.exp(logp) * (logp - ref))

    np.testing.assert_allclose(-jax.grad(surrogate)(logits), jax.grad(objective)(logits), atol=1e-6)


def test_nash_mp_pg_loss_gradient_is_the_exact_proximal_gradient(table):
    # Gradient of P(π_θ ≻ π_opp) − β KL(π_θ‖μ) − (1/η) KL(π_θ‖π_k), opponent and anchor fixed.
    logits = jax.random.normal(jax.random.PRNGKey(8), (4,))
    anchor_logp, ref_logp, preference = table
    x, beta, eta = 1, 0.3, 2.0
    ref, anchor = ref_logp[x], anchor_logp[x]
    opponent = jax.nn.log_softmax(jnp.array([0.3, -0.2, 0.1, 0.0]))

    def surrogate(lg):
        logp = jax.nn.log_softmax(lg)
        y, prefs, weights = _pairs(logp[None], opponent[None], preference, x)
        loss, _ = nash.nash_mp_pg_loss(
            logp[y], ref[y], anchor[y], prefs, beta=beta, eta=eta, weights=weights, reduction="sum"
        )
        return loss

    def objective(lg):
        logp = jax.nn.log_softmax(lg)
        p = jnp.exp(logp)
        win = p @ preference[x] @ jnp.exp(opponent)
        return win - beta * jnp.sum(p * (logp - ref)) - jnp.sum(p * (logp - anchor)) / eta

    np.testing.assert_allclose(-jax.grad(surrogate)(logits), jax.grad(objective)(logits), atol=1e-6)


def test_online_ipo_is_ipo_with_soft_labels_and_jits():
    keys = jax.random.split(jax.random.PRNGKey(9), 5)
    a, b, c, d = (jax.random.normal(k, (6,)) for k in keys[:4])
    p = jax.random.uniform(keys[4], (6,))
    loss, metrics = jax.jit(lambda *z: nash.online_ipo_loss(*z, tau=0.2))(a, b, c, d, p)
    # (h − (p − ½)/τ)² by hand.
    h = (a - c) - (b - d)
    np.testing.assert_allclose(loss, jnp.mean((h - (p - 0.5) / 0.2) ** 2), rtol=1e-5)
    reference, _ = ipo_loss(a, b, c, d, beta=0.2, preference_probs=p)
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    md, _ = nash.ipo_md_loss(a, b, c, d, p, tau=0.2, reduction="sum")
    np.testing.assert_allclose(md, loss * metrics["denominator"], rtol=1e-5)


def test_online_ipo_population_gradient_vanishes_only_at_the_equilibrium():
    # Calandriello et al. (2024): self-play on the IPO loss is stationary at the regularised
    # equilibrium. Equilibrium from Nash-MP run to convergence (KL ~1e-7 there).
    key_p, key_t = jax.random.split(jax.random.PRNGKey(11))
    upper = jnp.triu(jax.random.uniform(key_p, (2, 4, 4)), 1)
    preference = upper + jnp.swapaxes(jnp.triu(1.0 - upper, 1), -1, -2) + 0.5 * jnp.eye(4)
    task = core.make_task(key_t, 2, 4, preference=preference)
    beta = 0.3
    eq = games.run_nash_mp(task, beta=beta, eta=2.0, num_iterations=150)[-1]
    grad = jax.jit(jax.grad(games.population_ipo_loss), static_argnames=("beta", "mixture"))
    at_eq = grad(eq, eq, task, beta=beta, mixture=0.0)
    at_ref = grad(task.ref_logp, task.ref_logp, task, beta=beta, mixture=0.0)
    # Loss terms are O(1/β²) ≈ 10; a float32 zero is ~1e-5 of that scale.
    assert float(jnp.max(jnp.abs(at_eq))) < 1e-4
    assert float(jnp.max(jnp.abs(at_ref))) > 1e-2
