import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import raft  # noqa: E402
from experiments.configs import raft as raft_config  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402


@pytest.fixture
def raft_run_config(tiny_online_config):
    def make(num_steps):
        config = tiny_online_config(raft_config.get_config(), num_steps)
        return config

    return make


def test_online_raft_raises_the_reward_model_score(tmp_path, raft_run_config):
    summary = raft.run(raft_run_config(12), str(tmp_path))
    # The kept replies are the best of 4 by the reward model, so they score above the mean.
    assert summary["selected_reward_first"] > summary["mean_reward_first"]
    # Fine-tuning on them moves the policy toward them: its samples score higher on
    # average over the last steps than over the first ones, and on the held-out prompts.
    assert summary["mean_reward_last"] > summary["mean_reward_first"]
    assert summary["eval_reward_score"] > summary["eval_reward_score_initial"]


def test_raft_settings_are_checked(tmp_path, raft_run_config):
    config = raft_run_config(1)
    config.ranking = "global"
    config.top_k = 1000
    with pytest.raises(ConfigError, match=r"config\.top_k=1000 exceeds"):
        raft.run(config, str(tmp_path))
