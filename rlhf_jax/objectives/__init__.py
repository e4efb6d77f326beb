"""Pure RLHF losses and estimators over arrays (no models, no data, no I/O).

Every objective is a jittable function of arrays with keyword hyper-parameters and an
explicit ``reduction`` that returns ``(loss, metrics)`` with ``metrics["denominator"]``
(see :mod:`~rlhf_jax.objectives.reduction`). Modules:

- :mod:`~rlhf_jax.objectives.reward_model`: Bradley–Terry and Safe-RLHF cost-model losses.
- :mod:`~rlhf_jax.objectives.pairwise`: the DPO family, selectable by name through
  :data:`PAIRWISE_LOSSES`, and :func:`~rlhf_jax.objectives.pairwise.weighted_sum`.
- :mod:`~rlhf_jax.objectives.unpaired`: KTO, unpaired AOT and BCO.
- :mod:`~rlhf_jax.objectives.listwise`: Plackett–Luce and LiPO-λ.
- :mod:`~rlhf_jax.objectives.modpo`: multi-objective DPO.
- :mod:`~rlhf_jax.objectives.sft`: masked token negative log-likelihood.
- :mod:`~rlhf_jax.objectives.kl`, :mod:`~rlhf_jax.objectives.kl_control`: KL estimators
  k1/k2/k3 and fixed/adaptive KL controllers.
- :mod:`~rlhf_jax.objectives.advantages`: GAE, RLOO and GRPO advantages.
- :mod:`~rlhf_jax.objectives.ppo`: clipped surrogate, clipped value loss, entropy bonus.
- :mod:`~rlhf_jax.objectives.nash`: geometric mixtures, Nash-MD, Nash-MP, online IPO,
  IPO-MD and INPO.
- :mod:`~rlhf_jax.objectives.safe_rlhf`: the Safe-RLHF Lagrangian advantage and multiplier.
- :mod:`~rlhf_jax.objectives.reward_strength`: ensemble preference strength, label
  flipping, soft labels, adaptive margins and the contrastive term (Secrets of RLHF II).
- :mod:`~rlhf_jax.objectives.vpl`: variational preference learning (latent-conditioned
  reward, posterior encoder, ELBO).
- :mod:`~rlhf_jax.objectives.heron`: hierarchical reward-factor comparisons.
- :mod:`~rlhf_jax.objectives.binary_feedback`: P[Love] models from sparse binary feedback.
- :mod:`~rlhf_jax.objectives.judge`: preferences read from a language model's verdict tokens.
- :mod:`~rlhf_jax.objectives.cpl`: contrastive preference learning and the regret and
  partial-return preference models.
- :mod:`~rlhf_jax.objectives.fdpg`: f-divergence distributional policy gradients.
- :mod:`~rlhf_jax.objectives.selm`: the optimism-biased SELM objective.
- :mod:`~rlhf_jax.objectives.rationale`: DPO with a rationale likelihood term.
- :mod:`~rlhf_jax.objectives.align_distil`: token-level teachers and distillation losses.
- :mod:`~rlhf_jax.objectives.raft`: reward-ranked fine-tuning selection and loss.
- :mod:`~rlhf_jax.objectives.hc_rlhf`: Student-t cost bounds and the high-confidence
  safety test.
- :mod:`~rlhf_jax.objectives.cgpo`: mixtures of judges and the constrained CRPG, CRRAFT
  and CODPO updates.
- :mod:`~rlhf_jax.objectives.fine_grained`: dense segment-level rewards from several
  reward models.
- :mod:`~rlhf_jax.objectives.macro_actions`: macro-action (MA-RLHF) advantages and PPO.
"""

from rlhf_jax.objectives import (
    advantages,
    align_distil,
    binary_feedback,
    cgpo,
    cpl,
    fdpg,
    fine_grained,
    hc_rlhf,
    heron,
    judge,
    kl,
    kl_control,
    listwise,
    macro_actions,
    modpo,
    nash,
    pairwise,
    ppo,
    raft,
    rationale,
    reduction,
    reward_model,
    reward_strength,
    safe_rlhf,
    selm,
    sft,
    unpaired,
    vpl,
)
from rlhf_jax.objectives.pairwise import PAIRWISE_LOSSES

__all__ = [
    "PAIRWISE_LOSSES",
    "advantages",
    "align_distil",
    "binary_feedback",
    "cgpo",
    "cpl",
    "fdpg",
    "fine_grained",
    "hc_rlhf",
    "heron",
    "judge",
    "kl",
    "kl_control",
    "listwise",
    "macro_actions",
    "modpo",
    "nash",
    "pairwise",
    "ppo",
    "raft",
    "rationale",
    "reduction",
    "reward_model",
    "reward_strength",
    "safe_rlhf",
    "selm",
    "sft",
    "unpaired",
    "vpl",
]
