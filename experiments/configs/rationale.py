"""Rationale-augmented DPO (Just et al., 2024) through the DPO experiment.

``ℓ(β h) − γ log π(r | x, y_w, y_l)/|r|`` with rationales written from the task's gold
reward breakdown. ``python experiments/dpo.py --config=experiments/configs/rationale.py
--workdir=runs/rdpo --config.init_from=runs/sft``
"""

import ml_collections

from experiments.configs import dpo


def get_config() -> ml_collections.ConfigDict:
    """Rationale DPO: β = 0.1, rationale weight γ = 1 on the per-token rationale NLL."""
    config = dpo.get_config()
    config.loss_name = "rationale_dpo"
    config.hyper = {"beta": 0.1, "rationale_weight": 1.0}
    return config
