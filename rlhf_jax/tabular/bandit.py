"""KL-penalised PPO on a one-step bandit table, with exact expectations.

Each prompt ``x`` is a one-step episode: the policy picks a response ``y`` and receives
``r(x, y)``. Following Ziegler et al. (2019) the KL penalty is folded into the reward,
``r_β(x, y) = r(x, y) − β log(π_old(y|x) / π_ref(y|x))`` (the k1 estimator on a single
token), and the advantage subtracts the exact value ``V(x) = E_{π_old}[r_β]``. The PPO
clipped surrogate (Schulman et al., 2017) is then averaged exactly over
``x ∼ ρ, y ∼ π_old`` by passing the probabilities ``ρ(x) π_old(y|x)`` as the token
weights of ``ppo_policy_loss`` on the ``[X, Y]`` table.

At ``π = π_old`` the surrogate's gradient is the exact policy gradient of
``E[r] − β KL(π ‖ π_ref)`` (score-function identity with ``E_π[∇ log π] = 0``), so the
iteration's fixed point is ``π* ∝ π_ref exp(r/β)`` (``core.kl_regularised_optimum``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
from jax import Array

from rlhf_jax.objectives.kl import kl_penalised_rewards
from rlhf_jax.objectives.ppo import ppo_policy_loss
from rlhf_jax.tabular.core import TabularTask, expected, kl, kl_regularised_optimum, log_policy


def kl_penalised_advantages(
    old_logp: Array, ref_logp: Array, reward: Array, *, beta: float | Array
) -> Array:
    """``A(x, y) = r_β(x, y) − E_{y'∼π_old}[r_β(x, y')]`` with ``r_β = r − β log(π_old/π_ref)``.

    Args:
      old_logp: ``[X, Y]`` log π_old (the sampling policy).
      ref_logp: ``[X, Y]`` log π_ref.
      reward: ``[X, Y]`` rewards.
      beta: KL coefficient β.

    Returns:
      ``[X, Y]`` exact advantages under π_old.
    """
    chex.assert_equal_shape([old_logp, ref_logp, reward])
    X, Y = reward.shape
    penalised = kl_penalised_rewards(
        reward.reshape(X * Y),
        old_logp.reshape(X * Y, 1),
        ref_logp.reshape(X * Y, 1),
        jnp.ones((X * Y, 1)),
        kl_coef=beta,
        estimator="k1",
    ).reshape(X, Y)
    return penalised - expected(old_logp, penalised)[:, None]


def exact_ppo_loss(
    logits: Array,
    old_logp: Array,
    advantages: Array,
    prompt_probs: Array,
    *,
    clip_eps: float,
) -> Array:
    """``E_{x∼ρ, y∼π_old}[−min(ρ_θ A, clip(ρ_θ, 1 ± ε) A)]`` computed exactly on the table.

    Args:
      logits: ``[X, Y]`` policy logits θ.
      old_logp: ``[X, Y]`` log π_old.
      advantages: ``[X, Y]`` advantages.
      prompt_probs: ``[X]`` prompt distribution ρ.
      clip_eps: PPO clip ε.

    Returns:
      The scalar population loss.
    """
    chex.assert_equal_shape([logits, old_logp, advantages])
    weights = prompt_probs[:, None] * jnp.exp(old_logp)
    loss, _ = ppo_policy_loss(
        log_policy(logits), old_logp, advantages, weights, clip_eps=clip_eps, reduction="sum"
    )
    return loss


def run_kl_ppo(
    task: TabularTask,
    *,
    beta: float,
    clip_eps: float = 0.2,
    learning_rate: float = 3.0,
    num_iterations: int = 300,
    inner_steps: int = 4,
) -> tuple[Array, Array]:
    """Run exact-expectation KL-penalised PPO on the table from π_ref.

    Each iteration freezes ``π_old = π``, computes the advantages of the KL-penalised
    reward, and takes ``inner_steps`` gradient-descent steps on the clipped surrogate.

    Args:
      task: the table (``ref_logits``, ``reward``, ``prompt_probs`` are used).
      beta: KL coefficient β.
      clip_eps: PPO clip ε.
      learning_rate: gradient-descent step size on the logits.
      num_iterations: outer PPO iterations.
      inner_steps: gradient steps per iteration.

    Returns:
      ``(final_logp, kl_to_optimum)``: the last policy ``[X, Y]`` and the trajectory of
      ``E_ρ KL(π* ‖ π_t)`` over iterations, ``[num_iterations]``.
    """
    optimum = kl_regularised_optimum(task.ref_logp, task.reward, beta)
    optimiser = optax.sgd(learning_rate)
    loss_grad = jax.grad(exact_ppo_loss)

    def inner(_: int, carry: tuple) -> tuple:
        logits, opt_state, old_logp, advantages = carry
        grads = loss_grad(logits, old_logp, advantages, task.prompt_probs, clip_eps=clip_eps)
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(logits, updates), opt_state, old_logp, advantages

    def outer(carry: tuple, _: None) -> tuple:
        logits, opt_state = carry
        old_logp = log_policy(logits)
        advantages = kl_penalised_advantages(old_logp, task.ref_logp, task.reward, beta=beta)
        logits, opt_state, _, _ = jax.lax.fori_loop(
            0, inner_steps, inner, (logits, opt_state, old_logp, advantages)
        )
        distance = jnp.sum(task.prompt_probs * kl(optimum, log_policy(logits)))
        return (logits, opt_state), distance

    @jax.jit
    def run(init: Array) -> tuple[Array, Array]:
        (logits, _), distances = jax.lax.scan(
            outer, (init, optimiser.init(init)), None, length=num_iterations
        )
        return log_policy(logits), distances

    return run(task.ref_logits)
