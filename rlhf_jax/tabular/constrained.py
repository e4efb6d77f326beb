"""The KL-regularised constrained optimum of a bandit table, and primal-dual iterations to it.

Problem (Dai et al., 2023, "Safe RLHF", with the KL regulariser of Ziegler et al., 2019):

    max_π  E_ρ E_π[r] − β E_ρ KL(π ‖ π_ref)    s.t.    E_ρ E_π[c] ≤ d.

Its Lagrangian ``E[r − λ c] − β KL + λ d`` is maximised for a fixed λ ≥ 0 by the Gibbs
policy ``π_λ ∝ π_ref exp((r − λ c)/β)``, and ``J_C(λ) = E_ρ E_{π_λ}[c]`` is non-increasing
in λ (``dJ_C/dλ = −E_ρ Var_{π_λ}(c)/β``). So strong duality gives the optimum by a 1-D
search: λ* = 0 if ``J_C(0) ≤ d``, otherwise the root of ``J_C(λ) = d``, found here by
bracketing and bisection. This is independent of the primal-dual iterations
(``run_primal_dual``), which use the Safe RLHF advantage and multiplier updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import Array

from rlhf_jax.objectives.safe_rlhf import (
    lagrange_multiplier_update,
    log_lagrange_multiplier_update,
    safe_rlhf_advantages,
)
from rlhf_jax.tabular.bandit import exact_ppo_loss, kl_penalised_advantages
from rlhf_jax.tabular.core import TabularTask, expected, log_policy


def lagrangian_policy(
    ref_logp: Array, reward: Array, cost: Array, multiplier: Array, *, beta: float
) -> Array:
    """``log π_λ`` with ``π_λ ∝ π_ref exp((r − λ c)/β)``, the maximiser of the Lagrangian."""
    return log_policy(ref_logp + (reward - multiplier * cost) / beta)


def expected_cost(task: TabularTask, logp: Array) -> Array:
    """``J_C(π) = E_{x∼ρ} E_{y∼π}[c(x, y)]`` (scalar)."""
    return jnp.sum(task.prompt_probs * expected(logp, task.cost))


def constrained_optimum(
    task: TabularTask, *, beta: float, threshold: float, bisection_steps: int = 60
) -> tuple[Array, Array]:
    """The constrained optimum and its multiplier by a 1-D search over λ.

    Doubles an upper bracket until ``J_C(λ_hi) ≤ d`` (at most 60 doublings), then bisects
    ``bisection_steps`` times on the sign of ``J_C(λ) − d``. If the constraint cannot be met
    (``d`` below the minimum cost) the bracket search stops and the last λ is returned.

    Args:
      task: the table (``ref_logits``, ``reward``, ``cost``, ``prompt_probs``).
      beta: KL coefficient β.
      threshold: cost threshold d.
      bisection_steps: bisection iterations (each halves the bracket).

    Returns:
      ``(log π*, λ*)``.
    """

    def cost_at(multiplier: Array) -> Array:
        logp = lagrangian_policy(task.ref_logp, task.reward, task.cost, multiplier, beta=beta)
        return expected_cost(task, logp)

    def needs_larger(carry: tuple[Array, Array]) -> Array:
        upper, doublings = carry
        return (cost_at(upper) > threshold) & (doublings < 60)

    def double(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        upper, doublings = carry
        return 2.0 * upper, doublings + 1

    def bisect(_: int, bracket: tuple[Array, Array]) -> tuple[Array, Array]:
        lower, upper = bracket
        middle = 0.5 * (lower + upper)
        too_costly = cost_at(middle) > threshold
        return jnp.where(too_costly, middle, lower), jnp.where(too_costly, upper, middle)

    @jax.jit
    def solve() -> tuple[Array, Array]:
        upper, _ = jax.lax.while_loop(needs_larger, double, (jnp.asarray(1.0), jnp.asarray(0)))
        _, upper = jax.lax.fori_loop(0, bisection_steps, bisect, (jnp.asarray(0.0), upper))
        multiplier = jnp.where(cost_at(0.0) <= threshold, 0.0, upper)
        logp = lagrangian_policy(task.ref_logp, task.reward, task.cost, multiplier, beta=beta)
        return logp, multiplier

    return solve()


def run_primal_dual(
    task: TabularTask,
    *,
    beta: float,
    threshold: float,
    policy_learning_rate: float = 10.0,
    multiplier_learning_rate: float = 0.3,
    num_steps: int = 2000,
    initial_multiplier: float = 1.0,
    log_multiplier: bool = False,
) -> tuple[Array, Array]:
    """Safe RLHF primal-dual iterations with exact expectations on the table.

    Each step takes one gradient step on the exact policy-gradient surrogate with the
    combined advantage ``(A_r − λ A_c)/(1 + λ)`` (``safe_rlhf_advantages``; ``A_r`` carries
    the KL penalty in the reward), then one dual step on λ from the current expected cost
    (``lagrange_multiplier_update``, or ``log_lagrange_multiplier_update`` on ln λ).

    Args:
      task: the table.
      beta: KL coefficient β.
      threshold: cost threshold d.
      policy_learning_rate: gradient-descent step size on the logits.
      multiplier_learning_rate: α of the dual update.
      num_steps: primal-dual steps.
      initial_multiplier: λ₀ (> 0 when ``log_multiplier``).
      log_multiplier: update ln λ instead of λ.

    Returns:
      ``(log π_T, λ trajectory [num_steps])``.
    """
    optimiser = optax.sgd(policy_learning_rate)
    loss_grad = jax.grad(exact_ppo_loss)

    def step(carry: tuple, _: None) -> tuple:
        logits, opt_state, dual = carry
        multiplier = jnp.exp(dual) if log_multiplier else dual
        logp = log_policy(logits)
        reward_advantages = kl_penalised_advantages(logp, task.ref_logp, task.reward, beta=beta)
        cost_advantages = task.cost - expected(logp, task.cost)[:, None]
        advantages = safe_rlhf_advantages(reward_advantages, cost_advantages, multiplier)
        grads = loss_grad(logits, logp, advantages, task.prompt_probs, clip_eps=0.2)
        updates, opt_state = optimiser.update(grads, opt_state)
        cost = expected_cost(task, logp)
        if log_multiplier:
            dual = log_lagrange_multiplier_update(
                dual, cost, threshold=threshold, learning_rate=multiplier_learning_rate
            )
        else:
            dual = lagrange_multiplier_update(
                dual, cost, threshold=threshold, learning_rate=multiplier_learning_rate
            )
        logits = optax.apply_updates(logits, updates)
        return (logits, opt_state, dual), jnp.exp(dual) if log_multiplier else dual

    @jax.jit
    def run(init: Array) -> tuple[Array, Array]:
        dual = jnp.log(initial_multiplier) if log_multiplier else jnp.asarray(initial_multiplier)
        carry = (init, optimiser.init(init), jnp.asarray(dual, jnp.float32))
        (logits, _, _), multipliers = jax.lax.scan(step, carry, None, length=num_steps)
        return log_policy(logits), multipliers

    return run(task.ref_logits)
