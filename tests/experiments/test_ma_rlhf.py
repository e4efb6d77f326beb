"""End-to-end smoke test of experiments/ma_rlhf.py with the tiny preset (macros of 2 tokens).

The SFT policy and the reward model are freshly initialised tiny models exported by
``common.export_params`` (the layout the offline runs leave in their workdirs).
"""

import numpy as np
import pytest

from experiments import ma_rlhf
from experiments.configs import ma_rlhf as ma_configs
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl


@pytest.fixture(scope="module")
def offline(tmp_path_factory, export_offline_runs):
    return export_offline_runs(
        tmp_path_factory.mktemp("offline"), ma_configs.get_config("tiny"), scorers=("rm",)
    )


def test_ma_rlhf_experiment_raises_the_reward_model_score(offline, tmp_path):
    config = ma_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.kl_coef = 0.01
    config.eval_every = 8  # evaluations at steps 0 and 8 only
    summary = ma_rlhf.run(config, str(tmp_path))
    records = read_jsonl(tmp_path / JSONL_NAME)
    scores = [record["reward_score"] for record in records]
    # As in the PPO smoke test: seeded means over 8 samples of a reward model whose
    # scores spread about ±1; MA-PPO must raise the score it optimises.
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    # Macros of 2 tokens: a response of length n has ⌈n/2⌉ ∈ [n/2, n/2 + 1/2] of them.
    for record in records:
        half = record["response_length"] / 2
        assert half <= record["macros_per_response"] <= half + 0.5
    assert summary["steps"] == 8 and summary["macro_size"] == 2
    assert [e["step"] for e in summary["evaluations"]] == [0, 8]
    assert np.isfinite(summary["eval_gold_reward"]) and (tmp_path / "policy").is_dir()


def test_ma_rlhf_config_names_a_bad_granularity(offline, tmp_path):
    config = ma_configs.get_config("tiny")
    config.reward_from = str(offline / "rm")
    config.granularity = "sentence"
    with pytest.raises(ConfigError, match=r"config\.granularity"):
        ma_rlhf.run(config, str(tmp_path))
