"""Secrets of RLHF II (Wang et al., 2024, §3): Bradley–Terry plus a contrastive term.

The reward model is trained on ``L = L_rm + β · L_cl``: ``L_rm`` the Bradley–Terry loss,
``L_cl`` the SimCSE InfoNCE loss (Gao et al., 2021, eq. 1) of each pair's difference
representation ``h_c − h_r`` (the last-token hidden states the reward head reads), whose
positive is the same difference under a second dropout mask and whose negatives are the
other pairs of the batch. The view noise is residual dropout at SimCSE's rate p = 0.1
and τ = 0.05 is SimCSE's temperature (Gao et al., 2021). β = 0.1 is this project's choice,
not a value taken from the paper: it keeps the contrastive term (at most ``log B`` per
pair) from dominating the ranking loss (``log 2`` per pair at the start).
The preference-strength transforms of §2 need an ensemble and live in
``reward_strength.py``.

``python experiments/reward_model.py --config=experiments/configs/reward_contrastive.py
--workdir=runs/rm_contrastive --config.init_from=runs/sft``
"""

import ml_collections

from experiments.configs import reward_model


def get_config() -> ml_collections.ConfigDict:
    """Contrastive reward model: Bradley–Terry + 0.1 × InfoNCE(τ = 0.05) on dropout-0.1 views."""
    config = reward_model.get_config()
    config.reward_loss = "bradley_terry"
    config.contrastive_weight = 0.1
    config.contrastive_temperature = 0.05
    config.dropout_rate = 0.1
    return config
