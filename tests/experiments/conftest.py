"""Fixtures shared by the experiment smoke tests."""

import pathlib
import sys

import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import common, reward_model, sft  # noqa: E402
from experiments.configs import reward_model as reward_model_config  # noqa: E402
from experiments.configs import sft as sft_config  # noqa: E402
from rlhf_jax.models import Decoder, ScalarModel  # noqa: E402
from rlhf_jax.train.steps.common import split_model  # noqa: E402


@pytest.fixture(scope="session")
def export_offline_runs():
    """``export(root, config, scorers=("rm", "cm"))``: fresh tiny models as runs export them.

    Writes ``root/sft`` (a policy, seed 0) and one scorer workdir per name in ``scorers``
    (seeds 1, 2, ...), all with ``config``'s architecture, and returns ``root``. The
    online experiments load them through ``init_from``, ``reward_from`` and ``cost_from``
    exactly as they load trained runs.
    """

    def export(root, config, scorers=("rm", "cm")):
        architecture = common.model_config(config, common.build_tokenizer(config))
        for name in ("sft", *scorers):
            (root / name).mkdir(exist_ok=True)
        _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
        common.export_params(str(root / "sft"), "policy", policy, architecture)
        for seed, name in enumerate(scorers, start=1):
            _, scorer = split_model(ScalarModel(architecture, rngs=nnx.Rngs(seed)))
            common.export_params(str(root / name), "scorer", scorer, architecture)
        return root

    return export


TINY_TASK = dict(
    num_train_prompts=64,
    num_heldout_prompts=16,
    num_sft=64,
    num_sft_heldout=8,
    num_preference_pairs=256,
    num_preference_heldout=32,
)
TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64)


def shrink(config, num_steps, learning_rate):
    """``config`` on a tiny task and model, ``num_steps`` steps at ``learning_rate``."""
    config.task.update(TINY_TASK)
    config.model.update(TINY_MODEL)
    config.max_length = 96
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_steps = num_steps
    config.log_every = 4
    config.checkpoint_every = num_steps
    config.optimizer.update(learning_rate=learning_rate, warmup_steps=0)
    return config


@pytest.fixture(scope="session")
def tiny_sft_and_rm(tmp_path_factory):
    """Workdirs of a tiny trained SFT policy and a reward model trained on its trunk."""
    policy, scorer = tmp_path_factory.mktemp("sft"), tmp_path_factory.mktemp("rm")
    config = shrink(sft_config.get_config(), 10, 1e-2)
    config.num_samples = 0
    sft.run(config, str(policy))
    config = shrink(reward_model_config.get_config(), 30, 3e-3)
    config.init_from = str(policy)
    reward_model.run(config, str(scorer))
    return str(policy), str(scorer)


@pytest.fixture
def tiny_online_config(tiny_sft_and_rm):
    """``make(config, num_steps)``: an online run's config from the tiny SFT policy and RM."""

    def make(config, num_steps):
        config = shrink(config, num_steps, 3e-3)
        config.init_from, config.reward_from = tiny_sft_and_rm
        config.prompt_length = 48
        config.max_new_tokens = 24
        config.num_eval_prompts = 16
        config.eval_every = num_steps
        return config

    return make
