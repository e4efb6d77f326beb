"""Secrets of RLHF II (Wang et al., 2024, §2) reward modelling: "Flip + Soft Label + Margin".

An ensemble of earlier reward-model runs measures each pair's preference strength û;
pairs the ensemble disagrees with (û < 0) are flipped, weak pairs (û < 0.5 after the flip)
get the soft label 0.9, and every pair the adaptive margin û. The §3 contrastive term
combines with it through the keys of ``reward_contrastive.py``
(``--config.contrastive_weight=0.1 --config.dropout_rate=0.1``).
``python experiments/reward_model.py --config=experiments/configs/reward_strength.py
--workdir=runs/rm_strength --config.init_from=runs/sft
--config.strength.ensemble=runs/rm_seed0,runs/rm_seed1``
"""

import ml_collections

from experiments.configs import reward_model


def get_config() -> ml_collections.ConfigDict:
    """Strength-aware reward model: flip at û < 0, smooth at û < 0.5, margin û."""
    config = reward_model.get_config()
    config.reward_loss = "strength"
    config.strength.update(flip_threshold=0.0, soft_threshold=0.5, smoothing=0.1, margin_scale=1.0)
    return config
