import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import fdpg, reward_model, sft  # noqa: E402
from experiments.configs import fdpg as fdpg_config  # noqa: E402
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


def fdpg_run_config(start, num_steps):
    config = shrink(fdpg_config.get_config(), num_steps, 3e-3)
    config.init_from, config.reward_from = start
    config.prompt_length = 48
    config.max_new_tokens = 24
    config.num_eval_prompts = 16
    config.eval_every = num_steps
    config.beta = 0.01  # a target far from the reference for a reward model this weak
    return config


def test_fdpg_moves_the_policy_toward_the_reward_tilted_target(tmp_path, start):
    summary = fdpg.run(fdpg_run_config(start, 12), str(tmp_path))
    assert summary["divergence_name"] == "jensen_shannon"
    # Step 1 samples from the policy it updates: every importance weight π/q is 1.
    assert summary["importance_weight_first"] == pytest.approx(1.0, abs=1e-4)
    assert summary["kl_first"] == pytest.approx(0.0, abs=1e-4)  # policy = reference
    # The target π_ref·exp(r/β) puts more mass on replies the reward model prefers: the
    # policy's samples over the last six steps score higher on average than the first
    # step's (64 replies each), and the policy has left the reference.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    late = np.mean([record["reward_score"] for record in history[6:]])
    assert late > history[0]["reward_score"]
    assert summary["kl_last"] > 0.0
    assert np.isfinite(summary["divergence_last"])


def test_fdpg_settings_are_checked(tmp_path, start):
    config = fdpg_run_config(start, 1)
    config.temperature = 0.7
    with pytest.raises(ConfigError, match=r"config\.temperature=0\.7"):
        fdpg.run(config, str(tmp_path))
