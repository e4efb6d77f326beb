"""Tests of the HC-RLHF option of the Safe-RLHF step (``cost_bound="pessimistic"``)."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax.objectives.hc_rlhf import pessimistic_cost_per_sample
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.steps.safe_rlhf import SafeRLHFConfig, constraint_costs

COSTS = np.array([0.3, -1.2, 2.0, 0.7, 0.1, -0.4, 1.5, 0.9], np.float32)
SAMPLING = SamplingConfig(max_new_tokens=4, eos_id=1)


def config(**kwargs):
    return SafeRLHFConfig(sampling=SAMPLING, **kwargs)


def test_mean_bound_is_safe_rlhf():
    bound, per_sample = constraint_costs(jnp.asarray(COSTS), config())
    np.testing.assert_allclose(bound, COSTS.mean(), rtol=1e-6)
    np.testing.assert_array_equal(per_sample, COSTS)


@pytest.mark.parametrize("candidate_coef", [0.0, 4.0])
def test_pessimistic_bound_matches_scipy_student_t(candidate_coef):
    delta, safety_size, safety_coef = 0.1, 30, 2.0
    pessimistic = config(
        cost_bound="pessimistic",
        bound_delta=delta,
        safety_size=safety_size,
        candidate_coef=candidate_coef,
        safety_coef=safety_coef,
    )
    bound, per_sample = constraint_costs(jnp.asarray(COSTS), pessimistic)
    n = COSTS.size
    width = safety_coef * stats.t.ppf(1 - delta, safety_size - 1) / np.sqrt(safety_size)
    width += candidate_coef * stats.t.ppf(1 - delta, n - 1) / np.sqrt(n)
    # U_cand = ĉ + s·width with the Bessel-corrected s (Chittepu et al., 2025); float32
    # quantiles (bisection / Cornish–Fisher) agree with scipy to about 1e-5.
    np.testing.assert_allclose(bound, COSTS.mean() + COSTS.std(ddof=1) * width, rtol=1e-5)
    # The critic's costs are those whose score-function gradient is that of μ + κσ, with
    # κ the same total width.
    expected = pessimistic_cost_per_sample(jnp.asarray(COSTS), coef=float(width))
    np.testing.assert_allclose(per_sample, expected, rtol=1e-5, atol=1e-6)
    assert float(bound) > COSTS.mean()


def test_pessimistic_bound_needs_a_safety_set():
    with pytest.raises(ValueError, match="safety_size"):
        config(cost_bound="pessimistic", safety_size=1)
    with pytest.raises(ValueError, match="cost_bound"):
        config(cost_bound="optimistic")
