r"""Variational Preference Learning against Bradley–Terry on two opposed user groups.

The defaults are the run that separates the groups: the trunk of a group-``a`` reward model,
frozen, 6,000 steps of 32 fresh users each, free bits of 2 nats::

    python experiments/sft.py --config=experiments/configs/sft.py --workdir=runs/sft \
        --config.num_steps=60 --config.checkpoint_every=60 --config.num_samples=0
    python experiments/reward_model.py --config=experiments/configs/reward_model.py \
        --workdir=runs/rm --config.init_from=runs/sft --config.num_steps=100
    python experiments/vpl.py --config=experiments/configs/vpl.py --workdir=runs/vpl \
        --config.init_from=runs/sft --config.trunk_from=runs/rm

(``vpl.py:tiny`` selects the smoke-test preset; without ``trunk_from`` the frozen trunk is
the SFT policy's, whose embeddings do not carry the preference: 0.55 / 0.48 per group;
``--config.freeze_trunk=False --config.batch_size=4`` trains the trunk end to end, on
fewer users per step, since the trunk's activations for 32 users' 512 sequences do not
fit in memory.)
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
    # frozen language model); False trains the trunk end to end with the heads.
    config.freeze_trunk = True
    config.users = {
        "num_heldout": 400,
        "num_context": 4,  # K pairs that reveal a user's group to the encoder
        "num_query": 4,  # Q pairs scored under the user's latent
    }
    # free_bits: uncharged nats of KL per user (0 = the paper's ELBO, whose posterior
    # collapses onto the prior in these runs; 2 keeps it open).
    config.vpl = {
        "beta": 1.0,
        "free_bits": 2.0,
        "num_samples": 1,
        "latent_dim": 8,
        "hidden_dim": 64,
    }
    config.bt_num_steps = 100
    # Users per Bradley–Terry step (each brings K + Q pairs); the baseline trains the whole
    # trunk, so it takes fewer users per step than a frozen-trunk VPL run can.
    config.bt_batch_size = 4
    config.batch_size = 32  # fresh users per VPL step, each with K + Q pairs
    config.eval_batch_size = 8
    config.num_steps = 6000  # heads only on a frozen trunk: seconds
    config.max_length = 256
    config.log_every = 250
    config.checkpoint_every = 2000
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
        config.users.update(num_heldout=64)
        config.max_length = 96
        config.batch_size = 8
        config.num_steps = 40
        config.bt_num_steps = 20
        config.log_every = 4
        config.checkpoint_every = 40
        config.optimizer.update(learning_rate=3e-3, warmup_steps=0)
    return config
