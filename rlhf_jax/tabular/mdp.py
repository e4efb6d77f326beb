"""A small tabular MDP with exact optimal advantages, for segment-preference objectives.

An MDP has states ``s ∈ {0..S-1}``, actions ``a ∈ {0..A-1}``, transitions
``P(s' | s, a)``, a reward ``r(s, a)`` and a discount γ. Its MaxEnt (soft) optimum at
temperature α is the fixed point of the soft Bellman equations

    Q*(s, a) = r(s, a) + γ Σ_{s'} P(s'|s, a) V*(s'),    V*(s) = α log Σ_a exp(Q*(s, a)/α),

with optimal advantage ``A* = Q* − V*`` and optimal policy ``π*(a|s) = exp(A*(s, a)/α)``,
so ``A*(s, a) = α log π*(a|s)``: the bijection between optimal advantages and the optimal
policy that Contrastive Preference Learning rests on (Hejna et al., 2023, §3; Ziebart,
2010). Without a temperature, ``V* = max_a Q*`` (the hard optimum that Knox et al., 2022,
use in the regret preference model).

A segment ``σ = (s_0, a_0, ..., s_{L-1}, a_{L-1})`` is scored by discounted sums
``Σ_t γ^t g(s_t, a_t)`` of a table ``g`` (rewards: the partial return; optimal advantages:
the negated regret). ``enumerate_segments`` lists every segment of a given length with its
probability under a start distribution, a behaviour policy and the dynamics, so that a
preference loss over segment pairs is an exact finite sum.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


@chex.dataclass(frozen=True)
class TabularMDP:
    """A finite discounted MDP.

    Attributes:
      transitions: ``[S, A, S]`` P(s' | s, a); each ``[s, a]`` row sums to one.
      reward: ``[S, A]`` r(s, a).
      discount: γ ∈ [0, 1).
    """

    transitions: Array
    reward: Array
    discount: float

    @property
    def num_states(self) -> int:
        """Number of states S."""
        return self.reward.shape[0]

    @property
    def num_actions(self) -> int:
        """Number of actions A."""
        return self.reward.shape[1]


def make_mdp(
    key: Array,
    num_states: int = 3,
    num_actions: int = 2,
    *,
    discount: float = 0.9,
    reward_scale: float = 1.0,
) -> TabularMDP:
    """A random MDP with full-support Dirichlet(1) transitions and Gaussian rewards."""
    k_p, k_r = jax.random.split(key)
    transitions = jax.random.dirichlet(k_p, jnp.ones(num_states), (num_states, num_actions)).astype(
        jnp.float32
    )
    reward = reward_scale * jax.random.normal(k_r, (num_states, num_actions))
    return TabularMDP(transitions=transitions, reward=reward, discount=discount)


def optimal_q(
    mdp: TabularMDP, *, temperature: float | None = None, iterations: int = 400
) -> tuple[Array, Array]:
    """``(Q*, V*)`` by value iteration: soft at ``temperature`` α, hard (max) when None.

    The Bellman operator is a γ-contraction in the sup norm for both backups, so after
    ``n`` iterations from zero the error is at most ``γⁿ max|r| / (1 − γ)``. The loop is a
    ``lax.scan``, so the result is differentiable in the reward (used to fit rewards under
    the regret preference model).

    Returns:
      ``Q* [S, A]`` and ``V* [S]``.
    """
    chex.assert_rank(mdp.transitions, 3)
    chex.assert_shape(mdp.reward, mdp.transitions.shape[:2])

    def backup(q: Array) -> Array:
        if temperature is None:
            return jnp.max(q, axis=-1)
        return temperature * jax.nn.logsumexp(q / temperature, axis=-1)

    def step(q: Array, _) -> tuple[Array, None]:
        return mdp.reward + mdp.discount * mdp.transitions @ backup(q), None

    q, _ = jax.lax.scan(step, jnp.zeros_like(mdp.reward), None, length=iterations)
    return q, backup(q)


def optimal_advantages(
    mdp: TabularMDP, *, temperature: float | None = None, iterations: int = 400
) -> Array:
    """``A*(s, a) = Q*(s, a) − V*(s)``, ``[S, A]`` (soft at ``temperature``, hard if None)."""
    q, v = optimal_q(mdp, temperature=temperature, iterations=iterations)
    return q - v[:, None]


def soft_optimal_log_policy(mdp: TabularMDP, *, temperature: float, iterations: int = 400) -> Array:
    """``log π*(a|s) = A*(s, a)/α`` for the MaxEnt optimum at temperature α, ``[S, A]``."""
    return optimal_advantages(mdp, temperature=temperature, iterations=iterations) / temperature


def enumerate_segments(
    mdp: TabularMDP, length: int, behaviour_logp: Array, start_probs: Array | None = None
) -> tuple[Array, Array, Array]:
    """Every segment of ``length`` steps and its probability.

    ``P(σ) = ρ(s_0) Π_t μ(a_t|s_t) Π_{t<L-1} P(s_{t+1}|s_t, a_t)`` with start distribution
    ρ (uniform when None) and behaviour policy μ.

    Args:
      mdp: the MDP.
      length: segment length L.
      behaviour_logp: ``[S, A]`` log μ(a|s).
      start_probs: ``[S]`` ρ.

    Returns:
      ``states [N, L]`` and ``actions [N, L]`` (int32) and ``probs [N]`` with
      ``N = (S·A)^L``; segments impossible under the dynamics have probability 0.
    """
    S, A = mdp.num_states, mdp.num_actions
    chex.assert_shape(behaviour_logp, (S, A))
    if start_probs is None:
        start_probs = jnp.full((S,), 1.0 / S)
    steps = np.array(list(itertools.product(range(S * A), repeat=length)), np.int32)
    states, actions = jnp.asarray(steps // A), jnp.asarray(steps % A)
    return (
        states,
        actions,
        _segment_probs(mdp.transitions, behaviour_logp, start_probs, states, actions),
    )


@jax.jit
def _segment_probs(
    transitions: Array, behaviour_logp: Array, start_probs: Array, states: Array, actions: Array
) -> Array:
    log_probs = jnp.log(start_probs[states[:, 0]])
    log_probs += jnp.sum(behaviour_logp[states, actions], axis=-1)
    moves = transitions[states[:, :-1], actions[:, :-1], states[:, 1:]]
    return jnp.exp(log_probs) * jnp.prod(moves, axis=-1)


def segment_sums(table: Array, states: Array, actions: Array, discount: float) -> Array:
    """Discounted sums ``Σ_t γ^t g(s_t, a_t)`` of an ``[S, A]`` table over ``[N, L]`` segments."""
    chex.assert_equal_shape([states, actions])
    discounts = discount ** jnp.arange(states.shape[-1], dtype=table.dtype)
    return jnp.sum(discounts * table[states, actions], axis=-1)
