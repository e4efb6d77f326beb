"""End-to-end smoke test of experiments/ppo.py with the tiny preset.

The SFT policy and the reward model it starts from are exported by
``common.export_params`` from freshly initialised tiny models (the layout an SFT or
reward-model run leaves in its workdir), which keeps the test to one compilation of the
PPO iteration.
"""

import json
import os

import numpy as np
import pytest
from flax import nnx

from experiments import common, ppo
from experiments.configs import ppo as ppo_configs
from rlhf_jax.models import Decoder, ScalarModel
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.steps.common import split_model


def export_offline_runs(root, config):
    """``root/sft`` with a policy and ``root/rm`` with a scorer, as the offline runs export."""
    architecture = common.model_config(config, common.build_tokenizer(config))
    _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
    common.export_params(str(root / "sft"), "policy", policy, architecture)
    _, scorer = split_model(ScalarModel(architecture, rngs=nnx.Rngs(1)))
    common.export_params(str(root / "rm"), "scorer", scorer, architecture)
    return root


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    (root / "sft").mkdir()
    (root / "rm").mkdir()
    return export_offline_runs(root, ppo_configs.get_config("tiny"))


def test_ppo_experiment_raises_the_reward_model_score(offline, tmp_path):
    config = ppo_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.kl_coef = 0.01
    summary = ppo.run(config, str(tmp_path))
    scores = [record["reward_score"] for record in read_jsonl(tmp_path / JSONL_NAME)]
    # Rollout means over 8 samples of a reward model whose scores spread about ±1;
    # seeded, so deterministic. PPO must raise the score it optimises.
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    assert summary["steps"] == 8
    assert [e["step"] for e in summary["evaluations"]] == [0, 4, 8]
    for key in ("eval_gold_reward", "eval_gold_cost", "eval_reward_score", "kl_last"):
        assert np.isfinite(summary[key])
    assert 0.0 <= summary["eval_harm_rate"] <= 1.0
    with open(os.path.join(tmp_path, "summary.json")) as f:
        assert json.load(f)["steps"] == 8
    assert (tmp_path / "policy").is_dir()


def test_ppo_config_errors_name_the_key(offline, tmp_path):
    config = ppo_configs.get_config("tiny")
    config.reward_from = str(offline / "rm")
    config.max_new_tokens = 40  # 40 + 40 > max_length 64
    with pytest.raises(ConfigError, match=r"config\.max_new_tokens"):
        ppo.run(config, str(tmp_path))
    config = ppo_configs.get_config("tiny")
    config.reward_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"config\.reward_from"):
        ppo.run(config, str(tmp_path))
    config = ppo_configs.get_config("tiny")
    config.kl_mode = "penalty"
    with pytest.raises(ConfigError, match=r"config\.kl_mode"):
        ppo.run(config, str(tmp_path))
