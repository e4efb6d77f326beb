"""Regularised preference games on a table: the equilibrium, exploitability and the online methods.

For each prompt the β-regularised game of Munos et al. (2023), is

    max_π min_{π'}  f(π, π') = P(π ≻ π') − β KL(π ‖ μ) + β KL(π' ‖ μ),

symmetric and zero-sum, with a unique equilibrium ``π*_β ∝ μ exp(P(y ≻ π*_β)/β)``.
The exploitability of π is the best response's gain,

    e(π) = max_{π'} [P(π' ≻ π) − β KL(π' ‖ μ)] − [P(π ≻ π) − β KL(π ‖ μ)]
         = β log Σ_y μ(y) exp(P(y ≻ π)/β) − ½ + β KL(π ‖ μ),

which is ≥ 0, zero exactly at the equilibrium, and half the duality gap
``max_{π'} f(π', π) − min_{π'} f(π, π')`` (by symmetry). It is a convex function of π
(a log-sum-exp of a linear function plus a KL), so the equilibrium is computed here,
independently of any of the learning dynamics, by minimising ``e`` with L-BFGS
(``core.minimise``). With β = 0, ``e(π) = max_y P(y ≻ π) − ½``.

The drivers run the methods with exact expectations from ``init_logp`` (μ by default)
and return the trajectory of the policies: Nash-MD, Nash-MP and INPO by their closed-form
steps, online IPO and IPO-MD by
gradient descent on the exact population IPO loss (pairs weighted by their probability
under the stop-gradient sampling policy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.nash import (
    geometric_mixture_logp,
    inpo_step,
    ipo_md_loss,
    nash_md_step,
    nash_mp_step,
)
from rlhf_jax.tabular.core import TabularTask, kl, log_policy, minimise, preference_against


def exploitability(logp: Array, ref_logp: Array, preference: Array, *, beta: float) -> Array:
    """Exploitability ``e(π)`` per prompt in the β-regularised game, ``[X]`` (module docstring).

    Args:
      logp: ``[X, Y]`` log π.
      ref_logp: ``[X, Y]`` log μ.
      preference: ``[X, Y, Y]`` P(y ≻ y').
      beta: regularisation β ≥ 0.

    Returns:
      ``[X]`` exploitabilities (the duality gap is twice this).
    """
    payoff = preference_against(preference, logp)
    self_play = jnp.einsum("xa,xa->x", jnp.exp(logp), payoff)
    if beta == 0.0:
        return jnp.max(payoff, axis=-1) - self_play
    best_response = beta * jax.nn.logsumexp(ref_logp + payoff / beta, axis=-1)
    return best_response - self_play + beta * kl(logp, ref_logp)


@functools.partial(jax.jit, static_argnames=("beta", "steps"))
def regularised_equilibrium(
    preference: Array, ref_logp: Array, *, beta: float, steps: int = 1000
) -> Array:
    """``log π*_β`` by L-BFGS minimisation of the summed exploitability over prompts.

    Args:
      preference: ``[X, Y, Y]`` P(y ≻ y').
      ref_logp: ``[X, Y]`` log μ.
      beta: regularisation β > 0.
      steps: maximum L-BFGS iterations.

    Returns:
      ``[X, Y]`` log π*_β.
    """

    def total(logits: Array) -> Array:
        return jnp.sum(exploitability(log_policy(logits), ref_logp, preference, beta=beta))

    return log_policy(minimise(total, ref_logp, steps=steps, tolerance=1e-9))


def kl_to_equilibrium(trajectory: Array, equilibrium_logp: Array, prompt_probs: Array) -> Array:
    """``E_ρ KL(π* ‖ π_t)`` for every iterate of a ``[N, X, Y]`` trajectory, ``[N]``."""
    distances = jax.vmap(lambda logp: kl(equilibrium_logp, logp))(trajectory)
    return distances @ prompt_probs


def _iterate(step, init: Array, num_iterations: int) -> Array:
    def body(logp: Array, _: None) -> tuple[Array, Array]:
        new = step(logp)
        return new, new

    return jax.lax.scan(body, init, None, length=num_iterations)[1]


@functools.partial(jax.jit, static_argnames="num_iterations")
def run_nash_md(
    task: TabularTask,
    *,
    beta: float | Array,
    eta: float | Array,
    num_iterations: int,
    init_logp: Array | None = None,
) -> Array:
    """Nash-MD from μ (Munos et al., 2023); one preference query per iteration.

    Returns:
      ``[num_iterations, X, Y]`` the iterates ``log π_1 … log π_N``.
    """
    return _iterate(
        lambda logp: nash_md_step(logp, task.ref_logp, task.preference, eta=eta, tau=beta),
        task.ref_logp if init_logp is None else init_logp,
        num_iterations,
    )


@functools.partial(jax.jit, static_argnames="num_iterations")
def run_nash_mp(
    task: TabularTask,
    *,
    beta: float | Array,
    eta: float | Array,
    num_iterations: int,
    init_logp: Array | None = None,
) -> Array:
    """Nash Mirror Prox from μ (Tiapkin et al., 2025); two preference queries per iteration.

    Returns:
      ``[num_iterations, X, Y]`` the iterates ``log π_1 … log π_N`` (full steps).
    """
    return _iterate(
        lambda logp: nash_mp_step(logp, task.ref_logp, task.preference, eta=eta, beta=beta)[0],
        task.ref_logp if init_logp is None else init_logp,
        num_iterations,
    )


@functools.partial(jax.jit, static_argnames="num_iterations")
def run_inpo(
    task: TabularTask,
    *,
    beta: float | Array,
    eta: float | Array,
    num_iterations: int,
    init_logp: Array | None = None,
) -> Array:
    """INPO's exact online-mirror-descent iterates from μ (Zhang et al., 2024).

    Each iterate is the minimiser of INPO's population loss (``inpo_step``).

    Returns:
      ``[num_iterations, X, Y]``.
    """
    return _iterate(
        lambda logp: inpo_step(logp, task.ref_logp, task.preference, eta=eta, tau=beta),
        task.ref_logp if init_logp is None else init_logp,
        num_iterations,
    )


def population_ipo_loss(
    logits: Array,
    sampling_logp: Array,
    task: TabularTask,
    *,
    beta: float | Array,
    mixture: float | Array,
) -> Array:
    """Exact online-IPO / IPO-MD population loss at fixed sampling policy.

    ``Σ_x ρ(x) Σ_{y,y'} w(y|x) w(y'|x) ℓ_IPO(y, y')`` with ``w = sg(π^μ_mixture)`` built
    from ``sampling_logp`` (``mixture = 0`` gives online IPO's ``w = sg(π)``) and the soft
    label ``P(y ≻ y')``; ``ℓ_IPO`` is ``ipo_md_loss`` on each pair (the online-IPO loss
    applied to mixture samples; with ``mixture = 0`` it is online IPO).

    Args:
      logits: ``[X, Y]`` policy logits (differentiated).
      sampling_logp: ``[X, Y]`` log π of the sampling policy (held fixed).
      task: the table.
      beta: regularisation τ.
      mixture: geometric-mixture weight of the sampling distribution.

    Returns:
      The scalar population loss.
    """
    X, Y = logits.shape
    logp = log_policy(logits)
    weights_logp = geometric_mixture_logp(
        jax.lax.stop_gradient(sampling_logp), task.ref_logp, beta=mixture
    )
    pair_weights = task.prompt_probs[:, None, None] * (
        jnp.exp(weights_logp)[:, :, None] * jnp.exp(weights_logp)[:, None, :]
    )

    def pair_loss(first: Array, second: Array, ref_first: Array, ref_second: Array, p: Array):
        loss, _ = ipo_md_loss(
            first[None], second[None], ref_first[None], ref_second[None], p[None], tau=beta
        )
        return loss

    first = jnp.broadcast_to(logp[:, :, None], (X, Y, Y))
    second = jnp.broadcast_to(logp[:, None, :], (X, Y, Y))
    ref_first = jnp.broadcast_to(task.ref_logp[:, :, None], (X, Y, Y))
    ref_second = jnp.broadcast_to(task.ref_logp[:, None, :], (X, Y, Y))
    losses = jax.vmap(pair_loss)(
        first.reshape(-1),
        second.reshape(-1),
        ref_first.reshape(-1),
        ref_second.reshape(-1),
        task.preference.reshape(-1),
    )
    return jnp.sum(pair_weights.reshape(-1) * losses)


@functools.partial(jax.jit, static_argnames="num_iterations")
def run_online_ipo(
    task: TabularTask,
    *,
    beta: float | Array,
    learning_rate: float | Array,
    num_iterations: int,
    mixture: float | Array = 0.0,
    init_logp: Array | None = None,
) -> Array:
    """Online IPO (``mixture = 0``) or IPO-MD (``mixture > 0``) by exact self-play descent.

    Each iteration samples (exactly) from the current policy or its geometric mixture with
    μ, and takes one gradient step on the population IPO loss (Calandriello et al., 2024).

    Returns:
      ``[num_iterations, X, Y]``.
    """
    grad = jax.grad(population_ipo_loss)

    def step(logits: Array, _: None) -> tuple[Array, Array]:
        logits = logits - learning_rate * grad(
            logits, log_policy(logits), task, beta=beta, mixture=mixture
        )
        return logits, log_policy(logits)

    init = task.ref_logp if init_logp is None else init_logp
    return jax.lax.scan(step, init, None, length=num_iterations)[1]
