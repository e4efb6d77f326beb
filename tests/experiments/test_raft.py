import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import raft, reward_model, sft  # noqa: E402
from experiments.configs import raft as raft_config  # noqa: E402
from experiments.configs import reward_model as reward_model_config  # noqa: E402
from experiments.configs import sft as sft_config  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402

TASK = dict(
    num_train_prompts=64,
    num_heldout_prompts=16,
    num_sft=64,
    num_sft_heldout=8,
    num_preference_pairs=256,
    num_preference_heldout=32,
)
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64)


def shrink(config, num_steps, learning_rate):
    config.task.update(TASK)
    config.model.update(MODEL)
    config.max_length = 96
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_steps = num_steps
    config.log_every = 4
    config.checkpoint_every = num_steps
    config.optimizer.update(learning_rate=learning_rate, warmup_steps=0)
    return config


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny SFT policy and a reward model trained on its trunk."""
    policy, scorer = tmp_path_factory.mktemp("sft"), tmp_path_factory.mktemp("rm")
    config = shrink(sft_config.get_config(), 10, 1e-2)
    config.num_samples = 0
    sft.run(config, str(policy))
    config = shrink(reward_model_config.get_config(), 30, 3e-3)
    config.init_from = str(policy)
    reward_model.run(config, str(scorer))
    return str(policy), str(scorer)


def raft_run_config(start, num_steps):
    config = shrink(raft_config.get_config(), num_steps, 3e-3)
    config.init_from, config.reward_from = start
    config.prompt_length = 48
    config.max_new_tokens = 24
    config.num_eval_prompts = 16
    config.eval_every = num_steps
    return config


def test_online_raft_raises_the_reward_model_score(tmp_path, start):
    summary = raft.run(raft_run_config(start, 12), str(tmp_path))
    # The kept replies are the best of 4 by the reward model, so they score above the mean.
    assert summary["selected_reward_first"] > summary["mean_reward_first"]
    # Fine-tuning on them moves the policy toward them: its samples score higher on
    # average over the last steps than over the first ones, and on the held-out prompts.
    assert summary["mean_reward_last"] > summary["mean_reward_first"]
    assert summary["eval_reward_score"] > summary["eval_reward_score_initial"]


def test_raft_settings_are_checked(tmp_path, start):
    config = raft_run_config(start, 1)
    config.ranking = "global"
    config.top_k = 1000
    with pytest.raises(ConfigError, match=r"config\.top_k=1000 exceeds"):
        raft.run(config, str(tmp_path))
