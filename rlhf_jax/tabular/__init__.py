"""Tabular policies, exact population losses and closed-form optima for checking objectives.

- :mod:`~rlhf_jax.tabular.core`: the task (prompts, responses, reference, reward, cost,
  preference matrix), exact expectations and KL, the KL-regularised optimum, an L-BFGS
  minimiser and a sampled mode.
- :mod:`~rlhf_jax.tabular.preference_optima`: closed-form optima of the reward-model and
  DPO-family population losses.
- :mod:`~rlhf_jax.tabular.games`: the regularised Nash equilibrium of a preference table,
  exploitability, and Nash-MD / Nash-MP / INPO / online-IPO iterations.
- :mod:`~rlhf_jax.tabular.constrained`: the Safe-RLHF constrained optimum and primal-dual runs.
- :mod:`~rlhf_jax.tabular.bandit`: KL-penalised PPO on a one-step bandit.
- :mod:`~rlhf_jax.tabular.mdp`: small tabular MDPs with (soft-)optimal values and advantages.
- :mod:`~rlhf_jax.tabular.sequence`: tabular token-level sequence models with exact
  sequence probabilities and the token-level KL-regularised optimum.
"""

from rlhf_jax.tabular import bandit, constrained, core, games, mdp, preference_optima, sequence

__all__ = ["bandit", "constrained", "core", "games", "mdp", "preference_optima", "sequence"]
