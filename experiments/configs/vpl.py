"""Variational Preference Learning against Bradley–Terry on two opposed user groups.

``python experiments/vpl.py --config=experiments/configs/vpl.py --workdir=runs/vpl
--config.init_from=runs/sft`` (``vpl.py:tiny`` selects the smoke-test preset;
``--config.trunk_from=runs/rm`` starts the VPL trunk from a reward-model run's trunk).
"""

import ml_collections

from experiments.common import base_config
from experiments.configs.ppo import TINY_MODEL

PRESETS = ("", "tiny")


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """The shared keys plus the user population, the VPL heads and the baseline's steps.

    Args:
      preset: ``""`` (the ~5M-parameter byte model) or ``"tiny"`` (a tiny model and task).

    Raises:
      ValueError: for an unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} of configs/vpl.py: '' or 'tiny'")
    config = base_config()
    # A reward-model workdir whose scorer trunk seeds the VPL trunk ("" = init_from's).
    config.trunk_from = ""
    # True: embed every pair once with the trunk and train only the VPL heads (the paper's
    # frozen language model).
    config.freeze_trunk = False
    config.users = {
        "num_train": 1000,
        "num_heldout": 200,
        "num_context": 4,  # K pairs that reveal a user's group to the encoder
        "num_query": 4,  # Q pairs scored under the user's latent
    }
    # free_bits: uncharged nats of KL per user (0 = the paper's ELBO).
    config.vpl = {
        "beta": 1.0,
        "free_bits": 0.0,
        "num_samples": 1,
        "latent_dim": 8,
        "hidden_dim": 64,
    }
    config.bt_num_steps = 100
    config.batch_size = 4  # users per step: 4 · (K + Q) = 32 pairs, 64 sequences
    config.eval_batch_size = 8
    config.num_steps = 150
    config.max_length = 256
    config.checkpoint_every = 50
    config.optimizer.learning_rate = 5e-4
    if preset == "tiny":
        config.task.update(
            num_train_prompts=64,
            num_heldout_prompts=16,
            num_sft=64,
            num_sft_heldout=8,
            num_preference_pairs=256,
            num_preference_heldout=64,
        )
        config.model.update(TINY_MODEL)
        config.users.update(num_train=256, num_heldout=64)
        config.max_length = 96
        config.batch_size = 8
        config.num_steps = 40
        config.bt_num_steps = 20
        config.log_every = 4
        config.checkpoint_every = 40
        config.optimizer.update(learning_rate=3e-3, warmup_steps=0)
    return config
