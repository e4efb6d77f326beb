import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import align_distil as ad
from rlhf_jax.tabular import core
from rlhf_jax.tabular import sequence as sq

V, T = 3, 3
BETA_DPO = 0.4


@pytest.fixture(scope="module")
def models():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (T, V ** (T - 1), V)
    return [jax.random.normal(k, shape) for k in keys]  # ref, dpo, reverse dpo


def normalise(p):
    return p / np.sum(p, -1, keepdims=True)


def test_teacher_is_the_geometric_mixture_of_reference_and_dpo(models):
    ref, dpo, rev = (np.exp(np.asarray(jax.nn.log_softmax(m, -1), np.float64)) for m in models)
    c = 1.7  # extrapolation beyond the DPO model
    np.testing.assert_allclose(
        jnp.exp(ad.teacher_logp(models[0], models[1], coefficient=c)),
        normalise(ref ** (1 - c) * dpo**c),
        atol=1e-6,
    )
    per_token = jax.random.uniform(jax.random.PRNGKey(5), models[0].shape[:2], maxval=3.0)
    np.testing.assert_allclose(
        jnp.exp(ad.teacher_logp(*models, coefficient=per_token)),
        normalise(ref * (dpo / rev) ** np.asarray(per_token)[..., None]),
        atol=1e-6,
    )


def test_adaptive_coefficient_grows_with_the_l1_disagreement_of_the_two_models(models):
    dpo, rev = (np.asarray(jax.nn.softmax(m, -1), np.float64) for m in models[1:])
    l1 = np.abs(dpo - rev).sum(-1)
    coefficient = ad.adaptive_coefficient(models[1], models[2], scale=15.0)
    np.testing.assert_allclose(coefficient, 15.0 * l1 + 1e-3, rtol=1e-5)
    # Identical models: only the floor ε is left.
    identical = ad.adaptive_coefficient(models[1], models[1], scale=15.0, floor=0.01)
    np.testing.assert_allclose(identical, 0.01, rtol=1e-6)


def test_token_weights_scale_each_positions_kl_but_not_the_denominator(models):
    student, teacher = models[0][:2], jax.nn.log_softmax(models[1][:2], -1)
    mask = jnp.ones(student.shape[:2]).at[0, -1].set(0.0)
    weights = jax.random.uniform(jax.random.PRNGKey(3), mask.shape, minval=0.1, maxval=2.0)
    p = np.exp(np.asarray(jax.nn.log_softmax(student, -1), np.float64))
    kl = np.sum(p * (np.log(p) - np.asarray(teacher, np.float64)), -1)
    loss, metrics = ad.align_distil_loss(student, teacher, mask, token_weights=weights)
    m, w = np.asarray(mask), np.asarray(weights)
    np.testing.assert_allclose(loss, np.sum(m * w * kl) / np.sum(m), rtol=1e-5)
    assert float(metrics["denominator"]) == float(np.sum(m))


def rlhf_objective(student, ref, dpo, beta):
    """E_π[β_d log π_dpo/π_ref] − β KL(π ‖ π_ref) over the enumerated sequences."""
    logp = sq.sequence_log_probs(student)
    reward = BETA_DPO * (sq.sequence_log_probs(dpo) - sq.sequence_log_probs(ref))
    return jnp.sum(jnp.exp(logp) * (reward - beta * (logp - sq.sequence_log_probs(ref))))


def test_rlhf_objective_is_minus_beta_times_distillation_plus_log_partitions(models):
    ref, dpo, _ = models
    beta = 0.8
    student = jax.random.normal(jax.random.PRNGKey(9), ref.shape)
    teacher = ad.teacher_logp(ref, dpo, coefficient=BETA_DPO / beta)
    reach = sq.prefix_probs(student)
    distillation, _ = ad.align_distil_loss(student, teacher, reach, reduction="sum")
    z_ref, z_dpo = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(dpo, -1)
    log_z = jax.nn.logsumexp(z_ref + BETA_DPO / beta * (z_dpo - z_ref), -1)
    identity = -beta * (distillation - jnp.sum(reach * log_z))
    # The paper's equivalence theorem, an exact identity: float32 sums of 27 terms, 1e-5.
    np.testing.assert_allclose(rlhf_objective(student, ref, dpo, beta), identity, atol=1e-5)


def every_prefix(logits):
    """Weight 1 on every prefix that exists (row t has V^t of them): each KL term gets the
    same curvature, so L-BFGS pins every conditional (prefix probabilities would leave
    rare prefixes weakly determined); the minimiser is the teacher for any positive weights."""
    return (sq.prefix_probs(logits) > 0).astype(jnp.float32)


def distilled(teacher, weights, direction):
    def population(logits):
        return ad.align_distil_loss(logits, teacher, weights, direction=direction, reduction="sum")[
            0
        ]

    return core.minimise(population, jnp.zeros_like(teacher))


def test_distillation_optimum_is_the_kl_regularised_optimum_when_c_is_one(models):
    ref, dpo, _ = models
    beta = BETA_DPO  # c = β_d/β = 1
    teacher = ad.teacher_logp(ref, dpo, coefficient=1.0)
    student = distilled(teacher, every_prefix(ref), "reverse")
    reward = BETA_DPO * (sq.sequence_log_probs(dpo) - sq.sequence_log_probs(ref))
    optimum = core.kl_regularised_optimum(sq.sequence_log_probs(ref)[None], reward[None], beta)
    # L-BFGS on a sum of strictly convex KLs, one per prefix with weight 1:
    # 1e-3 on sequence log-probabilities, as for the other population minimisers.
    np.testing.assert_allclose(sq.sequence_log_probs(student), optimum[0], atol=1e-3)


def test_for_other_c_the_teacher_is_exact_for_one_token_and_a_surrogate_beyond(models):
    ref, dpo, _ = models
    beta = 2.0 * BETA_DPO  # c = 1/2
    # one token: teacher == π* ∝ π_ref exp(r/β)
    one_ref, one_dpo = ref[:1, :1], dpo[:1, :1]
    reward = BETA_DPO * (jax.nn.log_softmax(one_dpo, -1) - jax.nn.log_softmax(one_ref, -1))
    np.testing.assert_allclose(
        ad.teacher_logp(one_ref, one_dpo, coefficient=0.5)[0],
        core.kl_regularised_optimum(jax.nn.log_softmax(one_ref[0], -1), reward[0], beta),
        atol=1e-6,
    )
    # three tokens: forward-KL distillation still reaches the teacher, but the exact
    # optimum carries the soft values of the continuation (tabular.sequence)
    teacher = ad.teacher_logp(ref, dpo, coefficient=0.5)
    student = distilled(teacher, every_prefix(ref), "forward")
    np.testing.assert_allclose(
        sq.sequence_log_probs(student), sq.sequence_log_probs(teacher), atol=1e-3
    )
    token_reward = BETA_DPO * (jax.nn.log_softmax(dpo, -1) - jax.nn.log_softmax(ref, -1))
    exact = sq.soft_optimal_token_logp(ref, token_reward, beta)
    whole = BETA_DPO * (sq.sequence_log_probs(dpo) - sq.sequence_log_probs(ref))
    np.testing.assert_allclose(
        sq.sequence_log_probs(exact),
        core.kl_regularised_optimum(sq.sequence_log_probs(ref)[None], whole[None], beta)[0],
        atol=1e-5,
    )
    gap = jnp.max(jnp.abs(sq.sequence_log_probs(exact) - sq.sequence_log_probs(teacher)))
    assert gap > 1e-2, gap
