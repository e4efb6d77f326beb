import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tabular import core, games

BETA = 0.2


def _random_preference(key, num_prompts, num_responses):
    """A general (non-Bradley-Terry, generally intransitive) preference table."""
    upper = jnp.triu(jax.random.uniform(key, (num_prompts, num_responses, num_responses)), 1)
    lower = jnp.swapaxes(jnp.triu(1.0 - upper, 1), -1, -2)
    return upper + lower * (1 - jnp.eye(num_responses)) + 0.5 * jnp.eye(num_responses)


def _single_prompt_task(preference):
    Y = preference.shape[-1]
    zeros = jnp.zeros((1, Y))
    return core.TabularTask(
        ref_logits=zeros,
        reward=zeros,
        cost=zeros,
        preference=preference,
        prompt_probs=jnp.ones(1),
    )


@pytest.fixture(scope="module")
def game():
    k_pref, k_task = jax.random.split(jax.random.PRNGKey(0))
    task = core.make_task(k_task, 3, 5, preference=_random_preference(k_pref, 3, 5))
    equilibrium = games.regularised_equilibrium(task.preference, task.ref_logp, beta=BETA)
    return task, equilibrium


def test_random_preference_is_a_preference(game):
    task, _ = game
    p = task.preference
    np.testing.assert_allclose(p + jnp.swapaxes(p, -1, -2), 1.0, atol=1e-7)


def test_equilibrium_is_the_gibbs_fixed_point(game):
    # The solver minimises exploitability and never uses the fixed-point equation
    # π* ∝ μ exp(P(y ≻ π*)/β); check that equation. In float32 the exploitability is
    # resolved to ~1e-8 (cancellation of O(1) terms), so KL-accuracy is ~1e-7; allow 1e-6.
    task, eq = game
    mapped = core.log_policy(task.ref_logp + core.preference_against(task.preference, eq) / BETA)
    assert float(jnp.max(core.kl(eq, mapped))) < 1e-6
    assert (
        float(jnp.max(games.exploitability(eq, task.ref_logp, task.preference, beta=BETA))) < 1e-6
    )


def test_exploitability_is_the_best_response_gain(game):
    # Best response to a fixed π by the Gibbs variational principle (core's closed form,
    # not the log-sum-exp identity used by `exploitability`), then the gain written out.
    task, _ = game
    logp = task.ref_logp
    payoff = core.preference_against(task.preference, logp)
    best = core.kl_regularised_optimum(task.ref_logp, payoff, BETA)
    gain = core.expected(best, payoff) - BETA * core.kl(best, task.ref_logp)
    expected = gain - (core.expected(logp, payoff) - BETA * core.kl(logp, task.ref_logp))
    np.testing.assert_allclose(
        games.exploitability(logp, task.ref_logp, task.preference, beta=BETA), expected, atol=1e-6
    )
    assert float(jnp.min(expected)) > 1e-3  # μ itself is not the equilibrium here


@pytest.mark.parametrize(
    ("method", "kwargs", "iterations"),
    [
        (games.run_nash_mp, {"eta": 2.0}, 100),
        (games.run_inpo, {"eta": 1.0}, 200),
        (games.run_online_ipo, {"learning_rate": 0.5}, 600),
    ],
)
def test_last_iterate_converges_to_the_regularised_equilibrium(game, method, kwargs, iterations):
    # These methods have the regularised equilibrium as exact fixed point and converge
    # linearly; after these iteration counts their distance is at the solver's float32
    # floor (KL ~1e-7, exploitability ~1e-8). 1e-5 leaves a 100x margin and is far below
    # the KL from μ (≈0.3) and from the unregularised fixed points.
    task, eq = game
    trajectory = method(task, beta=BETA, num_iterations=iterations, **kwargs)
    assert float(games.kl_to_equilibrium(trajectory, eq, task.prompt_probs)[-1]) < 1e-5
    last_exploitability = games.exploitability(
        trajectory[-1], task.ref_logp, task.preference, beta=BETA
    )
    assert float(jnp.max(last_exploitability)) < 1e-5


def test_nash_md_converges_up_to_its_step_size_bias(game):
    # Munos et al. (2023), Nash-MD convergence theorem:
    # KL(π*, π_T) ≤ (1−ηβ)^T KL(π*, π_0) + 2η/β. The bias is O(η): its fixed point plays
    # against the mixture. Check the plateau is within the
    # theorem's bound and shrinks (at least linearly) with η.
    task, eq = game
    plateaus = []
    for eta in (0.4, 0.1):
        trajectory = games.run_nash_md(task, beta=BETA, eta=eta, num_iterations=400)
        distances = games.kl_to_equilibrium(trajectory, eq, task.prompt_probs)
        plateaus.append(float(distances[-1]))
        assert plateaus[-1] < 2 * eta / BETA
    assert plateaus[1] < 0.25 * plateaus[0] + 1e-6
    assert plateaus[1] < 1e-4


def test_ipo_md_converges_to_its_mixture_fixed_point_near_the_equilibrium(game):
    # IPO-MD's stationary points satisfy π ∝ μ exp(P(y ≻ π^μ_m)/β) (exact pairs from the
    # mixture). Check that equation to the online-IPO accuracy (KL 1e-5) and that the
    # distance to the equilibrium is O(m): below that of the m = 0.3 run.
    task, eq = game
    distances = []
    for mixture in (0.3, 0.1):
        last = games.run_online_ipo(
            task, beta=BETA, learning_rate=0.5, num_iterations=600, mixture=mixture
        )[-1]
        opponent = core.log_policy((1 - mixture) * last + mixture * task.ref_logp)
        mapped = core.log_policy(
            task.ref_logp + core.preference_against(task.preference, opponent) / BETA
        )
        assert float(jnp.max(core.kl(mapped, last))) < 1e-5
        distances.append(float(jnp.sum(task.prompt_probs * core.kl(eq, last))))
    assert distances[1] < distances[0]


def test_nash_mp_beats_nash_md_per_preference_query(game):
    # Tiapkin et al. (2025) count one query of P(· ≻ π) per proximal step: Nash-MP uses two
    # per iteration, Nash-MD one. After 40 queries, Nash-MP (η = 2, its linear rate
    # (1+2β)^(-N/2)) must be far closer than Nash-MD with its best step size on a grid
    # covering ηβ ≤ 1 (the range of Munos et al.'s theorem).
    task, eq = game
    queries = 40
    mp = games.run_nash_mp(task, beta=BETA, eta=2.0, num_iterations=queries // 2)
    mp_kl = float(games.kl_to_equilibrium(mp, eq, task.prompt_probs)[-1])
    md_kls = [
        float(
            games.kl_to_equilibrium(
                games.run_nash_md(task, beta=BETA, eta=eta, num_iterations=queries),
                eq,
                task.prompt_probs,
            )[-1]
        )
        for eta in (0.5, 1.0, 2.0, 5.0)
    ]
    assert mp_kl < 0.1 * min(md_kls)


def test_rock_paper_scissors_with_uniform_reference_gives_uniform():
    task = _single_prompt_task(core.rock_paper_scissors())
    uniform = jnp.full((1, 3), jnp.log(1 / 3))
    eq = games.regularised_equilibrium(task.preference, task.ref_logp, beta=0.1)
    np.testing.assert_allclose(eq, uniform, atol=1e-4)
    # Start the methods away from uniform so that convergence is not trivial.
    init = core.log_policy(jnp.array([[2.0, 0.0, -1.0]]))
    for trajectory in (
        games.run_nash_mp(task, beta=0.1, eta=2.0, num_iterations=200, init_logp=init),
        games.run_inpo(task, beta=0.1, eta=1.0, num_iterations=300, init_logp=init),
    ):
        np.testing.assert_allclose(trajectory[-1], uniform, atol=1e-4)
    # Unregularised exploitability of uniform play is zero (it is the Nash of RPS).
    assert abs(float(games.exploitability(uniform, uniform, task.preference, beta=0.0)[0])) < 1e-6


def test_condorcet_winner_concentrates_for_small_beta():
    # Response 0 beats every other response; responses 1-3 form a cycle.
    preference = jnp.array(
        [[[0.5, 0.9, 0.8, 0.7], [0.1, 0.5, 0.9, 0.2], [0.2, 0.1, 0.5, 0.9], [0.3, 0.8, 0.1, 0.5]]]
    )
    task = _single_prompt_task(preference)
    eq = games.regularised_equilibrium(preference, task.ref_logp, beta=0.02)
    # Against the winner every other response loses by ≥ 0.2, so π*(y)/π*(0) ≤ exp(−0.2/β)
    # ≈ e^{-10} for y ≠ 0 up to the effect of the winner's own mass: > 0.99 is safe.
    assert float(jnp.exp(eq[0, 0])) > 0.99
    last = games.run_nash_mp(task, beta=0.02, eta=2.0, num_iterations=300)[-1]
    assert float(jnp.exp(last[0, 0])) > 0.99
