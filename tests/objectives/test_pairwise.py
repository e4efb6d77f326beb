import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import pairwise
from rlhf_jax.tabular import core
from rlhf_jax.tabular import preference_optima as po

# Population minimisers are found by float32 L-BFGS on exact population losses whose
# curvature is at least ~1e-2 in every identifiable direction on these small tables, so a
# final gradient of ~1e-6 leaves errors ~1e-4; 1e-3 (the brief's tolerance) has 10x slack.
ATOL_OPT = 1e-3
BETA = 0.5


@pytest.fixture(scope="module")
def task():
    return core.make_task(jax.random.PRNGKey(0), num_prompts=2, num_responses=4)


@pytest.fixture(scope="module")
def sampling_logp(task):
    # A pair-sampling distribution μ different from π_ref, with full support.
    return core.log_policy(jax.random.normal(jax.random.PRNGKey(1), task.ref_logits.shape))


def random_batch(key, size=6):
    keys = jax.random.split(key, 6)
    logps = [-jnp.abs(3.0 * jax.random.normal(k, (size,))) - 0.1 for k in keys[:4]]
    lengths = [jax.random.randint(k, (size,), 1, 20).astype(jnp.float32) for k in keys[4:]]
    return logps, {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}


def policy_population(per_pair, ref_logp, weights, pair_arrays=()):
    """The population loss as a function of the policy's logit table."""

    def population(logits):
        return po.pairwise_population_loss(
            per_pair, core.log_policy(logits), ref_logp, weights, pair_arrays
        )

    return population


def free_log_ratio_population(per_pair, weights):
    """The population loss as a function of a free log-ratio table (zero reference)."""
    zeros = jnp.zeros(weights.shape[:2])
    return lambda a: po.pairwise_population_loss(per_pair, a, zeros, weights)


def minimise_policy(per_pair, task, weights, pair_arrays=()):
    population = policy_population(per_pair, task.ref_logp, weights, pair_arrays)
    return core.log_policy(core.minimise(population, jnp.zeros_like(task.ref_logits)))


def minimise_jointly(populations, shape):
    """Minimise several independent population losses as one problem (one compilation)."""

    def total(stacked):
        return sum(f(stacked[k]) for k, f in enumerate(populations))

    return core.minimise(total, jnp.zeros((len(populations), *shape)))


def two_response_task(preference_01):
    """X prompts with two responses each and P(0 ≻ 1 | x) = preference_01[x]."""
    p = jnp.asarray(preference_01)
    preference = jnp.stack(
        [jnp.stack([jnp.full_like(p, 0.5), p], -1), jnp.stack([1 - p, jnp.full_like(p, 0.5)], -1)],
        axis=1,
    )
    base = core.make_task(jax.random.PRNGKey(7), num_prompts=p.shape[0], num_responses=2)
    return base.replace(preference=preference)


# ---------------------------------------------------------------- DPO and label noise


def test_dpo_and_robust_dpo_on_flipped_labels_reach_the_kl_regularised_optimum(task, sampling_logp):
    # DPO on clean labels, and robust DPO on labels flipped at rate ε = 0.2 (which it
    # undoes), both minimise at π_ref exp(r/β); solved together as one problem.
    clean = po.pair_weights(task.prompt_probs, sampling_logp, task.preference)
    noisy = po.pair_weights(task.prompt_probs, sampling_logp, po.flip_labels(task.preference, 0.2))
    populations = [
        policy_population(po.per_pair_losses(pairwise.dpo_loss, beta=BETA), task.ref_logp, clean),
        policy_population(
            po.per_pair_losses(pairwise.robust_dpo_loss, beta=BETA, label_noise=0.2),
            task.ref_logp,
            noisy,
        ),
    ]
    found = minimise_jointly(populations, task.ref_logits.shape)
    expected = jnp.exp(core.kl_regularised_optimum(task.ref_logp, task.reward, BETA))
    for k, name in enumerate(["dpo", "robust_dpo"]):
        np.testing.assert_allclose(
            jnp.exp(core.log_policy(found[k])), expected, atol=ATOL_OPT, err_msg=name
        )


LABEL_NOISE_CASES = [
    # (loss, hyper-parameters, closed-form optimal β h as a function of p, P(0 ≻ 1) per prompt)
    # p = 1.0 is a deterministic label, for which plain DPO has no optimum.
    ("dpo", {"label_smoothing": 0.1}, po.conservative_dpo_optimal_margin, [0.3, 0.8, 1.0]),
    ("robust_dpo", {"label_noise": 0.1}, po.robust_dpo_optimal_margin, [0.3, 0.8, 0.85]),
    ("exo_pair", {"label_smoothing": 0.1}, po.exo_optimal_margin, [0.3, 0.8, 1.0]),
]


def test_label_noise_losses_reach_their_closed_form_pair_optimum():
    populations, expected = [], []
    for name, hyper, closed_form, probs in LABEL_NOISE_CASES:
        task = two_response_task(probs)
        weights = po.pair_weights(task.prompt_probs, task.ref_logp, task.preference)
        per_pair = po.per_pair_losses(pairwise.PAIRWISE_LOSSES[name], beta=BETA, **hyper)
        populations.append(policy_population(per_pair, task.ref_logp, weights))
        margin = closed_form(jnp.asarray(probs), next(iter(hyper.values())))
        expected.append(po.two_response_optimum(task.ref_logp, margin, BETA))
    found = minimise_jointly(populations, (3, 2))
    for k, (name, *_) in enumerate(LABEL_NOISE_CASES):
        np.testing.assert_allclose(
            jnp.exp(core.log_policy(found[k])), jnp.exp(expected[k]), atol=ATOL_OPT, err_msg=name
        )


# ---------------------------------------------------------------- IPO


@pytest.fixture(scope="module")
def general_preference(task):
    # A non-transitive, non-Bradley–Terry preference: P = σ(M) with M antisymmetric.
    a = jax.random.normal(jax.random.PRNGKey(3), task.preference.shape)
    return jax.nn.sigmoid(a - jnp.swapaxes(a, -1, -2))


def test_ipo_closed_form_solves_the_least_squares_problem(task, sampling_logp, general_preference):
    # Independent check of the closed form: solve the IPO least squares in numpy.
    beta = BETA
    closed = po.ipo_optimum(task.ref_logp, general_preference, sampling_logp, beta)
    for x in range(task.num_prompts):
        mu = np.exp(np.asarray(sampling_logp[x], np.float64))
        P = np.asarray(general_preference[x], np.float64)
        Y = mu.shape[0]
        rows, targets = [], []
        for y in range(Y):
            for z in range(Y):
                row = np.zeros(Y)
                row[y] += 1.0
                row[z] -= 1.0
                w = np.sqrt(mu[y] * mu[z])
                rows.append(w * row)
                targets.append(w * (P[y, z] - 0.5) / beta)
        g = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
        logp = np.asarray(task.ref_logp[x], np.float64) + g
        logp -= np.log(np.sum(np.exp(logp)))
        np.testing.assert_allclose(closed[x], logp, atol=1e-5)


def test_ipo_population_minimiser_hard_and_soft_labels(task, sampling_logp, general_preference):
    # Hard labels sampled from P, and soft labels p = P(y ≻ y') passed as preference_probs
    # on unlabelled pairs from μ⊗μ: both minimise at π_ref exp(P(y ≻ μ)/β).
    def soft(pc, pr, rc, rr, p):
        return pairwise.ipo_loss(
            pc[None], pr[None], rc[None], rr[None], preference_probs=p[None], beta=BETA
        )[0]

    hard_weights = po.pair_weights(task.prompt_probs, sampling_logp, general_preference)
    soft_weights = po.pair_weights(
        task.prompt_probs, sampling_logp, jnp.ones_like(general_preference)
    )
    populations = [
        policy_population(
            po.per_pair_losses(pairwise.ipo_loss, beta=BETA), task.ref_logp, hard_weights
        ),
        policy_population(jax.vmap(soft), task.ref_logp, soft_weights, (general_preference,)),
    ]
    found = minimise_jointly(populations, task.ref_logits.shape)
    expected = jnp.exp(po.ipo_optimum(task.ref_logp, general_preference, sampling_logp, BETA))
    for k, name in enumerate(["hard", "soft"]):
        np.testing.assert_allclose(
            jnp.exp(core.log_policy(found[k])), expected, atol=ATOL_OPT, err_msg=name
        )


def test_ipo_length_normalised_divides_each_log_ratio_by_its_length():
    (pc, pr, rc, rr), lengths = random_batch(jax.random.PRNGKey(4))
    p = jnp.linspace(0.2, 1.0, pc.shape[0])
    loss, _ = pairwise.ipo_loss(
        pc, pr, rc, rr, **lengths, beta=0.3, preference_probs=p, length_normalise=True
    )
    a_w = np.asarray(pc - rc) / np.asarray(lengths["chosen_lengths"])
    a_l = np.asarray(pr - rr) / np.asarray(lengths["rejected_lengths"])
    expected = np.mean((a_w - a_l - (np.asarray(p) - 0.5) / 0.3) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# ---------------------------------------------------------------- free-log-ratio optima


def test_absolute_reward_losses_fit_their_closed_form(task, sampling_logp):
    P = task.preference
    cases = [
        ("nca_pair", {}, po.nca_optimal_log_ratio(P, sampling_logp, BETA)),
        ("bco_pair", {"reward_shift": 0.3}, po.bco_optimal_log_ratio(P, sampling_logp, BETA, 0.3)),
        ("sppo_hard", {}, po.sppo_hard_optimal_log_ratio(P, sampling_logp, BETA)),
    ]
    weights = po.pair_weights(task.prompt_probs, sampling_logp, P)
    populations = [
        free_log_ratio_population(
            po.per_pair_losses(pairwise.PAIRWISE_LOSSES[name], beta=BETA, **hyper), weights
        )
        for name, hyper, _ in cases
    ]
    found = minimise_jointly(populations, weights.shape[:2])
    for k, (name, _, expected) in enumerate(cases):
        # Log-ratio scale: the curvature per entry is ≥ ~μ(y)ρ(x)β²/8 ≈ 3e-3, so 2e-3.
        np.testing.assert_allclose(found[k], expected, atol=2e-3, err_msg=name)


def test_bco_pair_returns_the_updated_running_mean():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(5))
    _, metrics = pairwise.bco_pair_loss(pc, pr, rc, rr, beta=0.2, reward_shift=0.4, shift_decay=0.9)
    batch_mean = 0.2 * (np.mean(pc - rc) + np.mean(pr - rr)) / 2
    np.testing.assert_allclose(metrics["reward_shift"], 0.9 * 0.4 + 0.1 * batch_mean, rtol=1e-5)


def test_nca_is_not_shift_invariant_but_dpo_is():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(6))
    dpo = pairwise.dpo_loss(pc, pr, rc, rr)[0], pairwise.dpo_loss(pc + 1, pr + 1, rc, rr)[0]
    nca = (
        pairwise.nca_pair_loss(pc, pr, rc, rr)[0],
        pairwise.nca_pair_loss(pc + 1, pr + 1, rc, rr)[0],
    )
    np.testing.assert_allclose(dpo[0], dpo[1], rtol=1e-6)
    assert abs(float(nca[0] - nca[1])) > 1e-3


# ---------------------------------------------------------------- SLiC, APO, DiscoPOP, AOT


def test_slic_reaches_its_margin_and_stops():
    beta, margin = 0.5, 1.0
    grad = jax.grad(lambda pc, pr: pairwise.slic_loss(pc, pr, 0 * pc, 0 * pr, beta=beta)[0], (0, 1))
    below = jnp.array([0.0]), jnp.array([0.0])  # β h = 0 < margin
    beyond = jnp.array([0.0]), jnp.array([-3.0])  # β h = 1.5 > margin
    np.testing.assert_allclose(pairwise.slic_loss(*below, *below, beta=beta)[0], margin)
    np.testing.assert_allclose(grad(*below), ([-beta], [beta]))
    assert float(pairwise.slic_loss(*beyond, jnp.zeros(1), jnp.zeros(1), beta=beta)[0]) == 0.0
    np.testing.assert_array_equal(grad(*beyond), ([0.0], [0.0]))


def test_apo_sign_behaviour():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(8), size=32)

    def grads(fn):
        return jax.grad(lambda c, r: fn(c, r, rc, rr, beta=0.5)[0], (0, 1))(pc, pr)

    zero_c, zero_r = grads(pairwise.apo_zero_loss)
    down_c, down_r = grads(pairwise.apo_down_loss)
    # APO-zero: descent raises every chosen and lowers every rejected likelihood.
    assert bool(jnp.all(zero_c < 0)) and bool(jnp.all(zero_r > 0))
    # APO-down: descent lowers every rejected likelihood and the pair's total likelihood.
    assert bool(jnp.all(down_r > 0)) and bool(jnp.all(down_c + down_r > 0))


def test_discopop_blends_logistic_and_exponential():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(9), size=64)
    beta, tau = 0.7, 0.05
    loss, _ = pairwise.discopop_loss(pc, pr, rc, rr, beta=beta, temperature=tau, reduction="sum")
    z = beta * np.asarray((pc - rc) - (pr - rr), np.float64)
    m = 1 / (1 + np.exp(-z / tau))
    expected = np.sum((1 - m) * np.log1p(np.exp(-z)) + m * np.exp(-z))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Tiny temperature: exactly the logistic loss below zero and the exponential above.
    small = 1e-4
    per = jax.vmap(
        lambda *a: pairwise.discopop_loss(*(v[None] for v in a), beta=beta, temperature=small)[0]
    )(pc, pr, rc, rr)
    np.testing.assert_allclose(
        per, np.where(z > 0, np.exp(-z), np.log1p(np.exp(-z))), rtol=1e-5, atol=1e-6
    )


def test_aot_pair_matches_sorted_margins_and_reduces_to_dpo():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(10))
    beta = 0.4
    loss, _ = pairwise.aot_pair_loss(pc, pr, rc, rr, beta=beta)
    u, v = np.sort(np.asarray(pc - pr)), np.sort(np.asarray(rc - rr))
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-beta * (u - v)))), rtol=1e-5)
    # Permuting the reference pairs alone leaves the loss unchanged (it compares quantiles).
    perm = jnp.array([3, 0, 5, 1, 4, 2])
    permuted, _ = pairwise.aot_pair_loss(pc, pr, rc[perm], rr[perm], beta=beta)
    np.testing.assert_allclose(permuted, loss, rtol=1e-6)
    # A batch of one is DPO.
    one = [a[:1] for a in (pc, pr, rc, rr)]
    np.testing.assert_allclose(
        pairwise.aot_pair_loss(*one, beta=beta)[0], pairwise.dpo_loss(*one, beta=beta)[0]
    )


# ---------------------------------------------------------------- reference-free losses


def test_simpo_without_margin_fits_the_reference_free_optimum(task, sampling_logp):
    # Lengths 1, γ = 0: β(log π(y) − log π(y')) = r(y) − r(y'), so π* ∝ exp(r/β).
    weights = po.pair_weights(task.prompt_probs, sampling_logp, task.preference)

    def single(pc, pr, rc, rr):
        one = jnp.ones(1)
        return pairwise.simpo_loss(
            pc[None],
            pr[None],
            rc[None],
            rr[None],
            chosen_lengths=one,
            rejected_lengths=one,
            beta=BETA,
            target_margin=0.0,
        )[0]

    found = minimise_policy(jax.vmap(single), task, weights)
    expected = core.log_policy(task.reward / BETA)
    np.testing.assert_allclose(jnp.exp(found), jnp.exp(expected), atol=ATOL_OPT)


def test_simpo_margin_and_length_normalisation():
    beta, gamma = 2.0, 0.5
    lengths = {"chosen_lengths": jnp.array([4.0]), "rejected_lengths": jnp.array([2.0])}
    # β(−4/4) − β(−3/2) = 1 = 2γ: loss log(1 + e^{−(1 − γ)}); at a margin of exactly γ, log 2.
    loss, _ = pairwise.simpo_loss(
        jnp.array([-4.0]),
        jnp.array([-3.0]),
        jnp.zeros(1),
        jnp.zeros(1),
        **lengths,
        beta=beta,
        target_margin=gamma,
    )
    np.testing.assert_allclose(loss, np.log1p(np.exp(-(1.0 - gamma))), rtol=1e-6)
    at_margin, _ = pairwise.simpo_loss(
        jnp.array([-4.0]),
        jnp.array([-2.5]),
        jnp.zeros(1),
        jnp.zeros(1),
        **lengths,
        beta=beta,
        target_margin=gamma,
    )
    np.testing.assert_allclose(at_margin, np.log(2.0), rtol=1e-6)
    # Doubling a response (summed log-prob and length) does not change the loss.
    doubled, _ = pairwise.simpo_loss(
        jnp.array([-8.0]),
        jnp.array([-3.0]),
        jnp.zeros(1),
        jnp.zeros(1),
        chosen_lengths=jnp.array([8.0]),
        rejected_lengths=jnp.array([2.0]),
        beta=beta,
        target_margin=gamma,
    )
    np.testing.assert_allclose(doubled, loss, rtol=1e-6)


def test_cpo_is_reference_free_dpo_plus_nll():
    (pc, pr, rc, rr), lengths = random_batch(jax.random.PRNGKey(11))
    loss, _ = pairwise.cpo_loss(pc, pr, rc, rr, **lengths, beta=0.3, nll_weight=0.7)
    dpo, _ = pairwise.dpo_loss(pc, pr, 0 * rc, 0 * rr, beta=0.3)
    nll = -np.mean(np.asarray(pc) / np.asarray(lengths["chosen_lengths"]))
    np.testing.assert_allclose(loss, dpo + 0.7 * nll, rtol=1e-5)


def test_orpo_matches_a_direct_odds_ratio_computation():
    (pc, pr, rc, rr), lengths = random_batch(jax.random.PRNGKey(12))
    loss, metrics = pairwise.orpo_loss(pc, pr, rc, rr, **lengths, odds_ratio_weight=0.25)
    p_w = np.exp(np.asarray(pc, np.float64) / np.asarray(lengths["chosen_lengths"]))
    p_l = np.exp(np.asarray(pr, np.float64) / np.asarray(lengths["rejected_lengths"]))
    odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    expected = np.mean(-np.log(p_w) + 0.25 * -np.log(odds_ratio / (1 + odds_ratio)))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_ratio"], np.mean(np.log(odds_ratio)), rtol=1e-5)


def test_length_normalised_losses_require_lengths():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(13))
    with pytest.raises(ValueError, match="chosen_lengths"):
        pairwise.simpo_loss(pc, pr, rc, rr)


# ---------------------------------------------------------------- f-divergences


def test_f_dpo_with_reverse_kl_is_dpo():
    (pc, pr, rc, rr), _ = random_batch(jax.random.PRNGKey(14))
    f_loss, f_metrics = pairwise.f_dpo_loss(pc, pr, rc, rr, beta=0.3, divergence="reverse_kl")
    loss, metrics = pairwise.dpo_loss(pc, pr, rc, rr, beta=0.3)
    np.testing.assert_allclose(f_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(f_metrics["reward_margin"], metrics["reward_margin"], rtol=1e-6)


def test_f_dpo_population_minimiser_is_the_f_regularised_optimum(task):
    weights = po.pair_weights(task.prompt_probs, task.ref_logp, task.preference)
    cases = [("forward_kl", 0.5), ("jensen_shannon", 0.5), ("alpha", 0.5)]
    populations = [
        policy_population(
            po.per_pair_losses(pairwise.f_dpo_loss, beta=BETA, divergence=divergence, alpha=alpha),
            task.ref_logp,
            weights,
        )
        for divergence, alpha in cases
    ]
    found = minimise_jointly(populations, task.ref_logits.shape)
    for k, (divergence, alpha) in enumerate(cases):
        expected = po.f_divergence_optimum(task.ref_logp, task.reward, BETA, divergence, alpha)
        np.testing.assert_allclose(
            jnp.exp(core.log_policy(found[k])), jnp.exp(expected), atol=ATOL_OPT, err_msg=divergence
        )


# ---------------------------------------------------------------- registry and combinator


def test_weighted_sum_equals_the_sum_of_its_parts():
    (pc, pr, rc, rr), lengths = random_batch(jax.random.PRNGKey(15))
    combined = pairwise.weighted_sum(
        [("dpo", 1.0, {"beta": 0.2}), ("sppo_hard", 0.5, {"beta": 0.3}), ("simpo", 2.0, {})]
    )

    def parts(c, r):
        return (
            pairwise.dpo_loss(c, r, rc, rr, beta=0.2)[0]
            + 0.5 * pairwise.sppo_hard_loss(c, r, rc, rr, beta=0.3)[0]
            + 2.0 * pairwise.simpo_loss(c, r, rc, rr, **lengths)[0]
        )

    def whole(c, r):
        return combined(c, r, rc, rr, **lengths)[0]

    np.testing.assert_allclose(whole(pc, pr), parts(pc, pr), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(whole, (0, 1))(pc, pr), jax.grad(parts, (0, 1))(pc, pr), rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown pairwise loss"):
        pairwise.weighted_sum([("dpp", 1.0, {})])


@pytest.mark.parametrize("name", sorted(pairwise.PAIRWISE_LOSSES))
def test_every_registered_loss_jits_and_vmaps(name):
    fn = pairwise.PAIRWISE_LOSSES[name]
    (pc, pr, rc, rr), lengths = random_batch(jax.random.PRNGKey(16), size=6)
    eager, metrics = fn(pc, pr, rc, rr, **lengths)
    jitted, _ = jax.jit(fn)(pc, pr, rc, rr, **lengths)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    assert {"denominator", "reward_margin", "reward_accuracy"} <= set(metrics)
    np.testing.assert_allclose(metrics["denominator"], 6.0)
    # vmap over groups of 3 pairs equals evaluating each group on its own.
    grouped = [a.reshape(2, 3) for a in (pc, pr, rc, rr)]
    grouped_lengths = {k: v.reshape(2, 3) for k, v in lengths.items()}
    vmapped, _ = jax.vmap(lambda *a: fn(*a[:4], chosen_lengths=a[4], rejected_lengths=a[5]))(
        *grouped, grouped_lengths["chosen_lengths"], grouped_lengths["rejected_lengths"]
    )
    for g in range(2):
        single, _ = fn(*(a[g] for a in grouped), **{k: v[g] for k, v in grouped_lengths.items()})
        np.testing.assert_allclose(vmapped[g], single, rtol=1e-5)
