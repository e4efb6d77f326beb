"""The tabular harness: a finite "language model" where every expectation is exact.

A task has prompts ``x ∈ {0..X-1}`` drawn with probabilities ``ρ(x)``, and for each
prompt a finite set of responses ``y ∈ {0..Y-1}``. A policy is a table of logits
``[X, Y]``; the reference policy, the true reward ``r(x, y)``, the true cost ``c(x, y)``
and the preference matrix ``P(y ≻ y' | x)`` are tables too. Because everything is finite,
population losses are exact sums over all prompts and pairs, so a test that minimises
one and compares the minimiser with the closed form the theory predicts is
deterministic.

The closed forms here are written independently of ``rlhf_jax.objectives`` so that an
objective can be checked against them rather than against itself.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from jax import Array


@chex.dataclass(frozen=True)
class TabularTask:
    """A tabular preference-learning world.

    Attributes:
      ref_logits: ``[X, Y]`` logits of the reference policy π_ref.
      reward: ``[X, Y]`` true reward r(x, y).
      cost: ``[X, Y]`` true cost c(x, y) (zeros when the task has none).
      preference: ``[X, Y, Y]`` P(y ≻ y' | x), with ``P + Pᵀ = 1`` and ``1/2`` on the
        diagonal. Bradley–Terry from ``reward`` unless given.
      prompt_probs: ``[X]`` the prompt distribution ρ.
    """

    ref_logits: Array
    reward: Array
    cost: Array
    preference: Array
    prompt_probs: Array

    @property
    def num_prompts(self) -> int:
        """Number of prompts X."""
        return self.ref_logits.shape[0]

    @property
    def num_responses(self) -> int:
        """Number of responses Y per prompt."""
        return self.ref_logits.shape[1]

    @property
    def ref_logp(self) -> Array:
        """``[X, Y]`` log π_ref(y | x)."""
        return log_policy(self.ref_logits)


def log_policy(logits: Array) -> Array:
    """Normalised log-probabilities ``log π(y|x)`` of a ``[X, Y]`` logit table."""
    return jax.nn.log_softmax(logits, axis=-1)


def bradley_terry_preference(reward: Array) -> Array:
    """``P(y ≻ y' | x) = σ(r(x, y) − r(x, y'))`` as a ``[X, Y, Y]`` table."""
    return jax.nn.sigmoid(reward[..., :, None] - reward[..., None, :])


def make_task(
    key: Array,
    num_prompts: int = 3,
    num_responses: int = 5,
    *,
    reward_scale: float = 1.0,
    ref_scale: float = 1.0,
    preference: Array | None = None,
    with_cost: bool = False,
) -> TabularTask:
    """A random task: Gaussian reference logits, rewards and (optionally) costs.

    Args:
      key: PRNG key.
      num_prompts: X.
      num_responses: Y.
      reward_scale: standard deviation of the rewards.
      ref_scale: standard deviation of the reference logits.
      preference: a ``[X, Y, Y]`` preference table; Bradley–Terry from the reward if None.
      with_cost: draw a Gaussian cost table instead of zeros.
    """
    k_ref, k_r, k_c = jax.random.split(key, 3)
    shape = (num_prompts, num_responses)
    reward = reward_scale * jax.random.normal(k_r, shape)
    cost = jax.random.normal(k_c, shape) if with_cost else jnp.zeros(shape)
    if preference is None:
        preference = bradley_terry_preference(reward)
    chex.assert_shape(preference, (num_prompts, num_responses, num_responses))
    return TabularTask(
        ref_logits=ref_scale * jax.random.normal(k_ref, shape),
        reward=reward,
        cost=cost,
        preference=preference,
        prompt_probs=jnp.full((num_prompts,), 1.0 / num_prompts),
    )


def rock_paper_scissors(win_prob: float = 1.0) -> Array:
    """A ``[1, 3, 3]`` non-transitive preference table: rock ≺ paper ≺ scissors ≺ rock.

    ``win_prob`` is P(winner ≻ loser); 1.0 is the deterministic game.
    """
    w, l = win_prob, 1.0 - win_prob
    return jnp.array([[[0.5, l, w], [w, 0.5, l], [l, w, 0.5]]])


def kl_regularised_optimum(ref_logp: Array, reward: Array, beta: float) -> Array:
    """``log π*(y|x)`` for ``π* ∝ π_ref exp(r/β)``, the maximiser of E[r] − β KL(π‖π_ref).

    Rafailov et al. (2023), eq. 4; the classical Gibbs variational principle.
    """
    return log_policy(ref_logp + reward / beta)


def kl(p_logp: Array, q_logp: Array) -> Array:
    """Exact ``KL(p ‖ q)`` per prompt, ``[X]``, from log-probability tables."""
    return jnp.sum(jnp.exp(p_logp) * (p_logp - q_logp), axis=-1)


def expected(logp: Array, values: Array) -> Array:
    """``E_{y∼π(·|x)}[v(x, y)]`` per prompt, ``[X]``."""
    return jnp.sum(jnp.exp(logp) * values, axis=-1)


def preference_against(preference: Array, opponent_logp: Array) -> Array:
    """``P(y ≻ π' | x) = Σ_{y'} π'(y'|x) P(y ≻ y' | x)``, ``[X, Y]``."""
    return jnp.einsum("xab,xb->xa", preference, jnp.exp(opponent_logp))


def pair_probs(first_logp: Array, second_logp: Array | None = None) -> Array:
    """``μ₁(y|x) μ₂(y'|x)`` for all ordered pairs, ``[X, Y, Y]``.

    The sampling distribution of a pair whose first element comes from μ₁ and second
    from μ₂ (μ₂ = μ₁ when omitted).
    """
    if second_logp is None:
        second_logp = first_logp
    return jnp.exp(first_logp)[:, :, None] * jnp.exp(second_logp)[:, None, :]


def minimise(
    loss_fn: Callable[[Array], Array],
    init: Array,
    *,
    steps: int = 500,
    tolerance: float = 1e-10,
) -> Array:
    """Minimise a smooth scalar function of a parameter table with L-BFGS, under jit.

    Population losses on a table are smooth and small, so a quasi-Newton method reaches
    the optimum to near machine precision in a few hundred iterations; this is what lets
    the tests compare minimisers with closed forms at 1e-3 or tighter. Stops after
    ``steps`` iterations or once the gradient norm is below ``tolerance``.
    """
    optimiser = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def not_done(carry: tuple[Array, optax.OptState, Array]) -> Array:
        _, state, i = carry
        grad = optax.tree.get(state, "grad")
        return (i < steps) & ((i == 0) | (optax.tree.norm(grad) > tolerance))

    def body(carry: tuple[Array, optax.OptState, Array]) -> tuple:
        params, state, i = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = optimiser.update(
            grad, state, params, value=value, grad=grad, value_fn=loss_fn
        )
        return optax.apply_updates(params, updates), state, i + 1

    @jax.jit
    def run(init: Array) -> Array:
        carry = (init, optimiser.init(init), jnp.asarray(0))
        return jax.lax.while_loop(not_done, body, carry)[0]

    return run(init)


def sample_pairs(
    key: Array,
    task: TabularTask,
    first_logp: Array,
    num_pairs: int,
    second_logp: Array | None = None,
) -> dict[str, Array]:
    """Sample labelled pairs ``(x, y₁, y₂)`` and return them as chosen/rejected indices.

    ``x ∼ ρ``, ``y₁ ∼ μ₁(·|x)``, ``y₂ ∼ μ₂(·|x)`` and the label ``y₁ ≻ y₂`` with
    probability ``P(y₁ ≻ y₂ | x)``; the preferred response is returned as ``chosen``.
    This is the sampled mode of the harness, for tests of estimators.
    """
    if second_logp is None:
        second_logp = first_logp
    k_x, k_1, k_2, k_l = jax.random.split(key, 4)
    x = jax.random.choice(k_x, task.num_prompts, (num_pairs,), p=task.prompt_probs)
    y1 = jax.random.categorical(k_1, first_logp[x])
    y2 = jax.random.categorical(k_2, second_logp[x])
    first_wins = jax.random.bernoulli(k_l, task.preference[x, y1, y2])
    return {
        "prompt": x,
        "chosen": jnp.where(first_wins, y1, y2),
        "rejected": jnp.where(first_wins, y2, y1),
    }
