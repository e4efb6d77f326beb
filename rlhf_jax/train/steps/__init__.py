"""Pure training steps ``step(state, batch, rng) -> (state, metrics)`` and their evaluators.

Public API:

- :func:`make_sft_step`, :func:`make_sft_eval`: supervised fine-tuning (masked token NLL).
- :func:`make_reward_step`, :func:`make_reward_eval`: reward and cost models
  (Bradley–Terry, Safe-RLHF cost, Plackett–Luce).
- :func:`make_dpo_step`, :func:`make_dpo_eval`, :func:`precompute_reference_logps`,
  :func:`initial_dpo_extra`: DPO and every loss of ``PAIRWISE_LOSSES``.
- :func:`make_ppo_step`, :func:`init_ppo_extra`: one PPO iteration (rollout, scoring,
  reference, values, GAE, clipped epochs) with KL in the reward or the loss.
- :func:`make_nash_md_step`, :func:`make_nash_md_generate`, :func:`make_nash_md_update`,
  :func:`init_nash_md_extra`: Nash-MD, IPO-MD and online IPO against a reward-model
  preference (fused) or a host-side oracle (generate, label, update).
- :func:`make_safe_rlhf_step`, :func:`init_safe_rlhf_extra`: PPO-Lagrangian with reward
  and cost critics.
- :func:`make_ma_rlhf_step`: PPO over macro actions (MA-RLHF).
- :func:`make_cgpo_step`, :func:`init_cgpo_extra`: CGPO's constrained updates (CRPG,
  CRRAFT, CODPO) under a mixture of judges.
- :func:`make_fine_grained_step`, :func:`init_fine_grained_extra`,
  :func:`make_segment_reward_step`: fine-grained RLHF with dense per-sentence rewards.
- :func:`make_raft_step`, :func:`init_raft_extra`: RAFT (best-of-n, then fine-tuning).
- :func:`make_fdpg_step`, :func:`init_fdpg_extra`: f-DPG toward an energy-based target.
- :func:`make_align_distil_step`, :func:`init_align_distil_extra`: AlignDistil's
  token-level distillation from a DPO model and the reference.
- :func:`make_lm_judge`: a language model's verdict probabilities as a preference model.
- :func:`make_vpl_step`, :func:`make_vpl_eval`, :func:`init_vpl_params`,
  :func:`embed_pairs`: VPL's latent-conditioned reward model over users' pairs (trunk
  trained or frozen).
- :data:`PREFERENCE_LOSSES`: the losses the DPO step selects by name.
- :func:`make_optimizer`, :func:`split_model`: shared plumbing (``steps.common``).
"""

from rlhf_jax.train.steps.align_distil import init_align_distil_extra, make_align_distil_step
from rlhf_jax.train.steps.cgpo import init_cgpo_extra, make_cgpo_step
from rlhf_jax.train.steps.common import make_optimizer, split_model
from rlhf_jax.train.steps.dpo import (
    PREFERENCE_LOSSES,
    initial_dpo_extra,
    make_dpo_eval,
    make_dpo_step,
    precompute_reference_logps,
)
from rlhf_jax.train.steps.fdpg import init_fdpg_extra, make_fdpg_step
from rlhf_jax.train.steps.fine_grained import (
    init_fine_grained_extra,
    make_fine_grained_step,
    make_segment_reward_step,
)
from rlhf_jax.train.steps.judge import make_lm_judge
from rlhf_jax.train.steps.ma_rlhf import make_ma_rlhf_step
from rlhf_jax.train.steps.nash_md import (
    init_nash_md_extra,
    make_nash_md_generate,
    make_nash_md_step,
    make_nash_md_update,
)
from rlhf_jax.train.steps.ppo import init_ppo_extra, make_ppo_step
from rlhf_jax.train.steps.raft import init_raft_extra, make_raft_step
from rlhf_jax.train.steps.reward import make_reward_eval, make_reward_step
from rlhf_jax.train.steps.safe_rlhf import init_safe_rlhf_extra, make_safe_rlhf_step
from rlhf_jax.train.steps.sft import make_sft_eval, make_sft_step
from rlhf_jax.train.steps.vpl import embed_pairs, init_vpl_params, make_vpl_eval, make_vpl_step

__all__ = [
    "PREFERENCE_LOSSES",
    "embed_pairs",
    "init_align_distil_extra",
    "init_cgpo_extra",
    "init_fdpg_extra",
    "init_fine_grained_extra",
    "init_nash_md_extra",
    "init_ppo_extra",
    "init_raft_extra",
    "init_safe_rlhf_extra",
    "init_vpl_params",
    "initial_dpo_extra",
    "make_align_distil_step",
    "make_cgpo_step",
    "make_dpo_eval",
    "make_dpo_step",
    "make_fdpg_step",
    "make_fine_grained_step",
    "make_lm_judge",
    "make_ma_rlhf_step",
    "make_nash_md_generate",
    "make_nash_md_step",
    "make_nash_md_update",
    "make_optimizer",
    "make_ppo_step",
    "make_raft_step",
    "make_reward_eval",
    "make_reward_step",
    "make_safe_rlhf_step",
    "make_segment_reward_step",
    "make_sft_eval",
    "make_sft_step",
    "make_vpl_eval",
    "make_vpl_step",
    "precompute_reference_logps",
    "split_model",
]
