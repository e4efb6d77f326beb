"""AlignDistil (Zhang et al., 2025): token-level distillation toward a DPO-built teacher.

``python experiments/align_distil.py --config=experiments/configs/align_distil.py
--workdir=runs/align_distil --config.init_from=runs/sft --config.dpo_from=runs/dpo``;
the contrastive, token-adaptive teacher also needs a reverse DPO run:
``--config.reverse_dpo_from=runs/reverse_dpo --config.teacher=contrastive
--config.adaptive=True``.
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """AlignDistil defaults: DPO teacher with c = 2 (extrapolating past the DPO policy), reverse KL.

    ``teacher="contrastive"`` reads the reverse DPO run ``reverse_dpo_from`` and extrapolates
    from the ``anchor`` (the DPO model) away from it; ``adaptive=True`` replaces c by
    ``c_t = adaptive_scale · ‖π_dpo − π_rdpo‖₁ + 10⁻³`` per token (the authors use κ = 10–15
    for 1.5B-parameter models, whose DPO and reverse DPO distributions are close; small
    models trained briefly disagree far more, hence κ = 1 here).
    """
    config = base_config()
    config.dpo_from = ""
    config.reverse_dpo_from = ""
    config.teacher = "dpo"
    config.anchor = "dpo"
    config.adaptive = False
    config.adaptive_scale = 1.0
    config.prompt_length = 80
    config.max_new_tokens = 96
    config.temperature = 1.0
    config.eval_every = 50
    config.num_eval_prompts = 64
    config.coefficient = 2.0
    config.direction = "reverse"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 5
    config.batch_size = 16
    config.num_steps = 200
    return config
