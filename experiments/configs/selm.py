"""SELM (Zhang et al., 2024): DPO with an optimism bias, through the DPO experiment.

``ℓ(β h) + α β log π(y_ref)/π_ref(y_ref)`` per pair with ``y_ref`` sampled once from the
SFT reference. ``python experiments/dpo.py --config=experiments/configs/selm.py
--workdir=runs/selm --config.init_from=runs/sft``
"""

import ml_collections

from experiments.configs import dpo


def get_config() -> ml_collections.ConfigDict:
    """SELM: β = 0.1 and α = 0.001 (the paper's range is 1e-4 to 1e-3)."""
    config = dpo.get_config()
    config.loss_name = "selm"
    config.hyper = {"beta": 0.1, "alpha": 0.001}
    return config
