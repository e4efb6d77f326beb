"""Reward model (``model_kind="reward"``) or Safe-RLHF cost model (``"cost"``) on the embedded task.

``python experiments/reward_model.py --config=experiments/configs/reward_model.py
--workdir=runs/rm --config.init_from=runs/sft`` (add ``--config.model_kind=cost`` for the
cost model). ``reward_loss`` selects a variant (``strength``, ``heron``,
``binary_feedback``); their settings are the ``strength``, ``heron`` and ``feedback`` keys.
``contrastive_weight``, ``contrastive_temperature`` and ``dropout_rate`` add the
contrastive term of Secrets of RLHF II §3 (``reward_contrastive.py``).
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """Reward-model defaults: Bradley–Terry without margin, trunk from an SFT run if given."""
    config = base_config()
    config.model_kind = "reward"
    config.reward_loss = "bradley_terry"
    config.margin = 0.0
    config.label_smoothing = 0.0
    config.sign_weight = 1.0
    # Secrets of RLHF II §3 (experiments/configs/reward_contrastive.py): β, τ and the
    # residual dropout that makes the two views; 0 and 0 train without either.
    config.contrastive_weight = 0.0
    config.contrastive_temperature = 0.05
    config.dropout_rate = 0.0
    config.strength = {
        "ensemble": "",  # comma-separated workdirs of reward-model runs
        "flip_threshold": 0.0,
        "soft_threshold": 0.0,
        "smoothing": 0.0,
        "margin_scale": 0.0,
    }
    config.heron = {"factors": "harmlessness,relevance,specificity", "margin_scale": 0.1}
    config.feedback = {"love_threshold": 6.0, "balance_classes": True}
    config.optimizer.learning_rate = 5e-4
    config.batch_size = 8
    config.num_steps = 150
    return config
