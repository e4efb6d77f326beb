"""Contrastive Preference Learning (Hejna et al., 2023) on one-step segments, through DPO.

A whole reply is one action, so CPL's regret-model loss is ``ℓ(α a_w − λ α a_l)`` with
``a = log π/π_ref`` (the SFT policy as π_ref, as the authors' code uses the BC policy).
``python experiments/dpo.py --config=experiments/configs/cpl.py --workdir=runs/cpl
--config.init_from=runs/sft``
"""

import ml_collections

from experiments.configs import dpo


def get_config() -> ml_collections.ConfigDict:
    """CPL: α = 0.1, conservative bias λ = 0.5 (§3.2; a value of the authors' configurations)."""
    config = dpo.get_config()
    config.loss_name = "cpl"
    config.hyper = {"alpha": 0.1, "conservative_bias": 0.5}
    return config
