import itertools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import raft, sft
from rlhf_jax.tabular import core


def test_best_of_n_selects_the_first_maximiser_and_respects_validity():
    rewards = jnp.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, -1.0, 5.0], [4.0, 1.0, 2.0]])
    np.testing.assert_array_equal(jnp.argmax(raft.best_of_n_mask(rewards), -1), [1, 0, 2, 0])
    np.testing.assert_array_equal(raft.best_of_n_mask(rewards).sum(-1), 1.0)
    valid = jnp.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(
        raft.best_of_n_mask(rewards, valid),
        [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]],
    )


def test_global_ranking_keeps_the_top_k_of_the_batch_with_index_tie_breaking():
    rewards = jnp.array([[1.0, 3.0, 3.0], [2.0, 3.0, 0.0]])
    np.testing.assert_array_equal(raft.top_k_mask(rewards, 2), [[0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(raft.top_k_mask(rewards, 4), [[0, 1, 1], [1, 1, 0]])
    valid = jnp.array([[1, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(raft.top_k_mask(rewards, 2, valid), [[0, 0, 1], [0, 1, 0]])


def test_loss_is_sft_on_the_selected_samples():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    P, n, T = 3, 4, 5
    logps = -jnp.abs(jax.random.normal(keys[0], (P, n, T)))
    mask = (jax.random.uniform(keys[1], (P, n, T)) > 0.3).astype(jnp.float32)
    rewards = jax.random.normal(keys[2], (P, n))
    best = np.argmax(np.asarray(rewards), -1)
    for normalisation in ("token", "sequence"):
        for reduction in ("mean", "sum"):
            ours, metrics = raft.raft_loss(
                logps, mask, rewards, normalisation=normalisation, reduction=reduction
            )
            subset = sft.sft_loss(
                logps[np.arange(P), best],
                mask[np.arange(P), best],
                normalisation=normalisation,
                reduction=reduction,
            )
            np.testing.assert_allclose(ours, subset[0], rtol=1e-6)
            np.testing.assert_allclose(metrics["denominator"], subset[1]["denominator"])
    np.testing.assert_allclose(metrics["selected_reward"], np.mean(np.max(rewards, -1)), rtol=1e-6)
    # global ranking: the two best samples of the whole batch
    top = np.argsort(-np.asarray(rewards).reshape(-1))[:2]
    ours, metrics = raft.raft_loss(logps, mask, rewards, ranking="global", top_k=2)
    subset = sft.sft_loss(logps.reshape(P * n, T)[top], mask.reshape(P * n, T)[top])
    np.testing.assert_allclose(ours, subset[0], rtol=1e-6)
    assert metrics["selected"] == 2


N_SAMPLES = 3


def best_of_n_distribution(logp, reward):
    """Closed form: the best reward class C wins with probability G(C)^n − G(<C)^n, where
    G sums π over the responses with reward ≤ (<) that of C; within a class of tied
    responses the first sample position wins, which by exchangeability picks y ∈ C with
    probability ∝ π(y)."""
    pi, r = np.exp(np.asarray(logp, np.float64)), np.asarray(reward)
    out = np.zeros_like(pi)
    for x in range(pi.shape[0]):
        for y in range(pi.shape[1]):
            tied, below = r[x] == r[x, y], np.sum(pi[x][r[x] < r[x, y]])
            in_class = np.sum(pi[x][tied])
            class_wins = (below + in_class) ** N_SAMPLES - below**N_SAMPLES
            out[x, y] = class_wins * pi[x, y] / in_class
    return out


def test_iterated_raft_with_exact_expectations_raises_the_expected_reward():
    task = core.make_task(jax.random.PRNGKey(3), num_prompts=2, num_responses=4)
    reward = task.reward.at[0, 2].set(task.reward[0, 1])  # a tie
    X, Y = reward.shape
    tuples = jnp.asarray(list(itertools.product(range(Y), repeat=N_SAMPLES)))  # [Y^n, n]

    def population(logits, sampling_logp):
        """E_{x∼ρ, y_1..n∼π_k}[RAFT loss] over every n-tuple, as a weighted sum."""
        logp = core.log_policy(logits)

        def one(x, tup):
            loss, _ = raft.raft_loss(
                logp[x, tup][None, :, None],
                jnp.ones((1, N_SAMPLES, 1)),
                reward[x, tup][None],
                reduction="sum",
            )
            return loss

        xs = jnp.repeat(jnp.arange(X), tuples.shape[0])
        tups = jnp.tile(tuples, (X, 1))
        probs = task.prompt_probs[xs] * jnp.exp(jnp.sum(sampling_logp[xs[:, None], tups], -1))
        return jnp.sum(probs * jax.vmap(one)(xs, tups))

    @jax.jit
    def run(logits):
        def stage(z, _):
            fitted = core.minimise(lambda w: population(w, core.log_policy(z)), z)
            return fitted, core.log_policy(fitted)

        return jax.lax.scan(stage, logits, None, length=3)[1]

    policies = run(task.ref_logits)
    # Stage 1 fits the best-of-n distribution of π_ref (the NLL minimiser is the target);
    # L-BFGS on this smooth cross-entropy: 1e-3 on probabilities as in the other tests.
    np.testing.assert_allclose(
        jnp.exp(policies[0]), best_of_n_distribution(task.ref_logp, reward), atol=1e-3
    )
    values = [core.expected(task.ref_logp, reward)] + [core.expected(p, reward) for p in policies]
    gains = np.diff(np.stack(values), axis=0)
    assert np.all(gains > 0), gains
