"""Sentence-level C1 (relevance) and C2 (factuality) reward models on the real QA-Feedback spans.

``python experiments/fine_grained_qa.py --config=experiments/configs/fine_grained_qa.py
--workdir=runs/fine_grained_qa`` (``fine_grained_qa.py:tiny`` selects the smoke-test
preset; ``--config.init_from=runs/sft`` starts both trunks from an SFT policy;
``--config.lm_steps=N`` first pretrains the trunk as a language model on the training
records' text).
"""

import ml_collections

from experiments.common import base_config
from experiments.configs.ppo import TINY_MODEL

PRESETS = ("", "tiny", "small")
#: A two-layer model of about 0.1M parameters for runs of minutes on a CPU.
SMALL_MODEL = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_hidden_size": 192,
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """The shared keys less the embedded task, plus the data source and the held-out part.

    Args:
      preset: ``""`` (the ~5M-parameter byte model, 1024-token inputs, 300 steps per
        model, no pretraining), ``"tiny"`` (a tiny model on 512-token inputs, 24 steps
        per model, no pretraining) or ``"small"`` (a two-layer model on 512-token inputs,
        240 language-model steps, then 120 steps per model).

    Raises:
      ValueError: for an unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} of configs/fine_grained_qa.py: '', 'tiny' or 'small'"
        )
    config = base_config()
    del config["task"]
    config.source_dir = ""  # "" reads the packaged dev_feedback.json.gz
    config.split = "dev"
    config.heldout_fraction = 0.2
    config.max_length = 1024
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_steps = 300
    config.log_every = 10
    config.optimizer.learning_rate = 5e-4
    config.lm_steps = 0  # language-model pretraining steps of the trunk; 0 skips the stage
    config.lm_learning_rate = 1e-3
    if preset == "tiny":
        config.model.update(TINY_MODEL)
        config.max_length = 512
        config.batch_size = 8
        config.num_steps = 24
        config.log_every = 1
        config.optimizer.warmup_steps = 0
        config.optimizer.learning_rate = 3e-3
    if preset == "small":
        config.model.update(SMALL_MODEL)
        config.max_length = 512
        config.num_steps = 120
        config.optimizer.warmup_steps = 10
        config.optimizer.learning_rate = 1e-3
        config.lm_steps = 240
        config.lm_learning_rate = 3e-3
    return config
