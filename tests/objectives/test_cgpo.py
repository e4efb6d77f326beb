"""Tests for CGPO: reductions to the unconstrained bases, and flagged samples never gaining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import cgpo
from rlhf_jax.objectives.pairwise import dpo_loss
from rlhf_jax.objectives.raft import raft_loss

# Same float32 arithmetic up to reassociation: 1e-6 relative.
RTOL = 1e-6


def test_mixture_of_judges_is_any():
    tokens = jnp.array([[7, 8, 9, 0], [7, 3, 0, 0], [5, 5, 5, 5]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    scores = jnp.array([0.1, 0.2, 0.9])
    judge = cgpo.mixture_of_judges(
        [
            lambda t, m, s: cgpo.length_violation(m, max_tokens=3),
            lambda t, m, s: cgpo.banned_token_violation(t, m, banned_ids=[3]),
            lambda t, m, s: cgpo.score_violation(s, threshold=0.5),
        ]
    )
    np.testing.assert_array_equal(judge(tokens, mask, scores), [False, True, True])
    text_judge = cgpo.mixture_of_judges([lambda p, r: "```" in r, lambda p, r: len(r) > 20])
    assert not bool(text_judge("q", "short answer"))
    assert bool(text_judge("q", "```code```"))


def _samples(key, P=3, n=4, T=5):
    keys = jax.random.split(key, 4)
    token_logps = -jnp.abs(jax.random.normal(keys[0], (P, n, T)))
    lengths = jax.random.randint(keys[1], (P, n), 2, T + 1)
    token_mask = (jnp.arange(T) < lengths[..., None]).astype(jnp.float32)
    rewards = jax.random.normal(keys[2], (P, n))
    baseline = jax.random.normal(keys[3], (P, 1))
    return token_logps, token_mask, rewards, baseline


@jax.jit
def _with_and_without_judges(token_logps, token_mask, rewards, baseline):
    """(constrained, base) value pairs with every judge passing."""
    none = jnp.zeros(rewards.shape, bool)
    logps = jnp.sum(token_logps * token_mask, -1)
    calibrated = cgpo.calibrated_reward(rewards, baseline)
    out = {"calibrated": (calibrated, 1.0 / (1.0 + jnp.exp(baseline - rewards)))}

    # CRPG: plain REINFORCE surrogate of the calibrated reward, same gradient.
    def crpg(lp):
        return cgpo.crpg_loss(lp.reshape(-1), calibrated.reshape(-1), none.reshape(-1))[0]

    def reinforce(lp):
        return -jnp.mean(calibrated * lp)

    out["crpg"] = (crpg(logps), reinforce(logps))
    out["crpg_grad"] = (jax.grad(crpg)(logps), jax.grad(reinforce)(logps))
    # CRRAFT: raft_loss.
    out["crraft"] = (
        cgpo.crraft_loss(token_logps, token_mask, rewards, none)[0],
        raft_loss(token_logps, token_mask, rewards)[0],
    )
    # CODPO: best vs worst by reward; loss = dpo_loss + λ · per-token NLL of the chosen.
    chosen, rejected, valid = cgpo.codpo_pairs(rewards, none)
    out["chosen"] = (chosen, jnp.argmax(rewards, 1))
    out["rejected"] = (rejected, jnp.argmin(rewards, 1))
    out["valid"] = (valid, jnp.ones_like(valid))
    ref_logps = logps + 0.3
    lengths = jnp.sum(token_mask, -1)
    pick = cgpo.select_samples
    pairs = (
        pick(logps, chosen),
        pick(logps, rejected),
        pick(ref_logps, chosen),
        pick(ref_logps, rejected),
    )
    codpo, _ = cgpo.codpo_loss(*pairs, pick(lengths, chosen), valid=valid, beta=0.5, nll_coef=0.7)
    nll = jnp.mean(-pairs[0] / pick(lengths, chosen))
    out["codpo"] = (codpo, dpo_loss(*pairs, beta=0.5)[0] + 0.7 * nll)
    return out


def test_all_pass_reduces_to_unconstrained_bases():
    results = _with_and_without_judges(*_samples(jax.random.PRNGKey(0)))
    for name, (got, want) in results.items():
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=name)


def test_codpo_pairs_respect_flags():
    rewards = jnp.array([[5.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [9.0, 8.0, 7.0, 6.0]])
    flags = jnp.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    chosen, rejected, valid = cgpo.codpo_pairs(rewards, flags)
    # Row 0: best unflagged is 2 (reward 3); flagged rank lowest, the lowest of them is 3.
    np.testing.assert_array_equal(chosen[:2], [2, 3])
    np.testing.assert_array_equal(rejected[:2], [3, 0])
    np.testing.assert_array_equal(valid, [True, True, False])


# --- flagged responses never gain probability -----------------------------------------
# One prompt, six responses; the flagged ones have the highest reward. From the uniform
# policy every sample-based loss below is also the exact population loss.
REWARD = jnp.array([0.1, 0.5, -0.3, 0.2, 2.0, 3.0])
FLAGS = jnp.array([0, 0, 0, 0, 1, 1], bool)
LR = 1.0


def _crpg(logits, flags):
    logp = jax.nn.log_softmax(logits)
    calibrated = cgpo.calibrated_reward(REWARD, jnp.zeros(()))
    return cgpo.crpg_loss(logp, calibrated, flags)[0]


def _crraft(logits, flags):
    logp = jax.nn.log_softmax(logits)[None, :, None]  # [P=1, n=6, T=1]
    return cgpo.crraft_loss(logp, jnp.ones_like(logp), REWARD[None], flags[None])[0]


def _codpo(logits, flags):
    logp = jax.nn.log_softmax(logits)
    chosen, rejected, valid = cgpo.codpo_pairs(REWARD[None], flags[None])
    ref = jnp.full_like(logp, -jnp.log(6.0))
    return cgpo.codpo_loss(
        logp[chosen], logp[rejected], ref[chosen], ref[rejected], jnp.ones(1), valid=valid
    )[0]


@pytest.mark.parametrize("loss_fn", [_crpg, _crraft, _codpo], ids=["crpg", "crraft", "codpo"])
def test_flagged_responses_do_not_gain_probability(loss_fn):
    logits = jnp.zeros(6)
    before = jax.nn.softmax(logits)
    after = jax.nn.softmax(logits - LR * jax.grad(loss_fn)(logits, FLAGS))
    assert bool(jnp.all(after[FLAGS] <= before[FLAGS]))
    # Control: without the judges the same step raises the best-reward response.
    unconstrained = jax.nn.softmax(logits - LR * jax.grad(loss_fn)(logits, jnp.zeros(6, bool)))
    assert float(unconstrained[5]) > float(before[5])


def test_crpg_never_pushes_up_a_flagged_logit():
    # From any policy and any batch, a flagged sample's logit gets a non-positive update.
    logits = jax.random.normal(jax.random.PRNGKey(3), (6,))
    grad = jax.grad(_crpg)(logits, FLAGS)
    assert bool(jnp.all(-grad[FLAGS] <= 0.0))
