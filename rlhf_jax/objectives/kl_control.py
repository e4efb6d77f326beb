"""KL-coefficient controllers as pure state updates (state in, state out).

Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", §2.2: to
hold the KL near a target ``KL_target`` the coefficient follows the proportional rule

    e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),    β_{t+1} = β_t (1 + K_β e_t),

and their released code takes ``K_β = n_steps / horizon`` (the number of samples in the
update over a horizon, 10 000 in the paper). The fixed controller keeps β constant.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jax import Array


@chex.dataclass(frozen=True)
class KLControllerState:
    """State of a KL controller.

    Attributes:
      kl_coef: the current coefficient β (scalar).
    """

    kl_coef: Array


def init_kl_controller(kl_coef: float) -> KLControllerState:
    """A controller state starting from coefficient ``kl_coef``."""
    return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def fixed_kl_update(state: KLControllerState, observed_kl: Array) -> KLControllerState:
    """The fixed controller: ``β_{t+1} = β_t`` whatever the observed KL."""
    del observed_kl
    return state


def adaptive_kl_update(
    state: KLControllerState,
    observed_kl: Array,
    *,
    target: float,
    horizon: float,
    n_steps: float,
) -> KLControllerState:
    """Ziegler et al. (2019) adaptive update, ``β ← β (1 + clip(KL/KL_target − 1, ±0.2) n/H)``.

    Args:
      state: current controller state.
      observed_kl: mean KL(π ‖ π_ref) per sequence measured on the last batch (scalar).
      target: KL_target.
      horizon: H, the horizon in samples over which the error is corrected.
      n_steps: n, the number of samples in the batch just observed (so ``K_β = n / H``).

    Returns:
      The new state.
    """
    chex.assert_rank(observed_kl, 0)
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return KLControllerState(kl_coef=state.kl_coef * (1.0 + error * n_steps / horizon))
