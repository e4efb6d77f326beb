"""HERON (Bukharin et al.): a reward model from a hierarchy of the task's reward factors.

Pairs are labelled by harmlessness first (gold cost), then relevance, then specificity,
each deciding when the replies differ by more than 0.1 of the factor's standard
deviation. ``python experiments/reward_model.py --config=experiments/configs/heron.py
--workdir=runs/rm_heron --config.init_from=runs/sft``
"""

import ml_collections

from experiments.configs import reward_model


def get_config() -> ml_collections.ConfigDict:
    """HERON labels: harmlessness ≻ relevance ≻ specificity, margins 0.1 σ."""
    config = reward_model.get_config()
    config.reward_loss = "heron"
    config.heron.update(factors="harmlessness,relevance,specificity", margin_scale=0.1)
    return config
