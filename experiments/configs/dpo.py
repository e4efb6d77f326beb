"""DPO (or any loss of ``PREFERENCE_LOSSES``) on the embedded task's helpfulness preferences.

``python experiments/dpo.py --config=experiments/configs/dpo.py --workdir=runs/dpo
--config.init_from=runs/sft`` (the SFT policy is both the start and the reference);
``--config.loss_name=ipo --config.hyper.beta=0.5`` switches the loss;
``--config.flip_preferences=True`` trains the reverse DPO model (chosen and rejected swapped).
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """DPO defaults: β = 0.1, reference log-probs computed inside the step."""
    config = base_config()
    config.loss_name = "dpo"
    config.hyper = {"beta": 0.1}
    config.reference = "in_step"
    config.prompt_length = 80  # SELM: prompt width when sampling from the reference
    config.explore_max_new_tokens = 96  # SELM: length of the reference samples
    config.flip_preferences = False  # True: learn the reverse preference (AlignDistil)
    config.optimizer.learning_rate = 2e-4
    config.batch_size = 8
    config.optimizer.warmup_steps = 10
    config.num_steps = 100
    return config
