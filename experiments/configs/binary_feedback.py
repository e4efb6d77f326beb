"""RLUF's P[Love] (Han et al., 2025): a reward model from sparse binary user reactions.

A reply is "loved" with probability ``σ((r − 6)/τ)`` (r its gold reward), so positives are
rare; the classifier is trained with balanced class weights and its score can serve as
one objective of a multi-objective run (``--config.reward_from`` of a policy run).
``python experiments/reward_model.py --config=experiments/configs/binary_feedback.py
--workdir=runs/rm_love --config.init_from=runs/sft``
"""

import ml_collections

from experiments.configs import reward_model


def get_config() -> ml_collections.ConfigDict:
    """P[Love]: love threshold 6 on the gold reward, balanced class weights."""
    config = reward_model.get_config()
    config.reward_loss = "binary_feedback"
    config.feedback.update(love_threshold=6.0, balance_classes=True)
    return config
