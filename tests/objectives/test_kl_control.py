import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import kl_control


def test_adaptive_controller_follows_ziegler_formula():
    state = kl_control.init_kl_controller(0.2)
    update = jax.jit(
        kl_control.adaptive_kl_update, static_argnames=("target", "horizon", "n_steps")
    )
    # Within the clip: β(1 + (KL/target − 1)·n/H).
    new = update(state, jnp.asarray(6.6), target=6.0, horizon=10_000.0, n_steps=256.0)
    np.testing.assert_allclose(new.kl_coef, 0.2 * (1 + 0.1 * 256 / 10_000), rtol=1e-6)
    # Error clipped to ±0.2.
    high = update(state, jnp.asarray(60.0), target=6.0, horizon=10_000.0, n_steps=256.0)
    low = update(state, jnp.asarray(0.0), target=6.0, horizon=10_000.0, n_steps=256.0)
    np.testing.assert_allclose(high.kl_coef, 0.2 * (1 + 0.2 * 0.0256), rtol=1e-6)
    np.testing.assert_allclose(low.kl_coef, 0.2 * (1 - 0.2 * 0.0256), rtol=1e-6)


def test_adaptive_controller_drives_kl_towards_target_in_a_scan():
    # A toy plant where the observed KL is inversely proportional to β: KL = c/β. The
    # controller's fixed point is β = c/target; it must move towards it monotonically.
    c, target = 1.2, 6.0

    def step(state, _):
        state = kl_control.adaptive_kl_update(
            state, c / state.kl_coef, target=target, horizon=100.0, n_steps=10.0
        )
        return state, state.kl_coef

    _, coefs = jax.lax.scan(step, kl_control.init_kl_controller(1.0), None, length=400)
    np.testing.assert_allclose(coefs[-1], c / target, rtol=1e-3)
    assert bool(jnp.all(jnp.diff(coefs) <= 0))


def test_fixed_controller_keeps_the_coefficient():
    state = kl_control.init_kl_controller(0.05)
    assert float(kl_control.fixed_kl_update(state, jnp.asarray(100.0)).kl_coef) == np.float32(0.05)
