"""Smoke test of experiments/deal.py with the tiny preset on freshly initialised models."""

import json

import numpy as np
import pytest

from experiments import deal
from experiments.configs import deal as deal_configs
from rlhf_jax.train.config import ConfigError


@pytest.fixture(scope="module")
def offline(tmp_path_factory, export_offline_runs):
    return export_offline_runs(tmp_path_factory.mktemp("offline"), deal_configs.get_config("tiny"))


def test_deal_experiment_writes_the_table_of_every_method(offline, tmp_path):
    config = deal_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.cost_from = str(offline / "cm")
    summary = deal.run(config, str(tmp_path))
    methods = summary["methods"]
    assert list(methods) == ["sampling", "greedy", "deal_rm_1", "deal_keyword"]
    for metrics in methods.values():
        for key in (
            "gold_reward",
            "gold_cost",
            "harm_rate",
            "rm_score",
            "cm_score",
            "keyword_rate",
        ):
            assert np.isfinite(metrics[key])
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["methods"]["greedy"]["gold_reward"] == methods["greedy"]["gold_reward"]
    table = (tmp_path / deal.RESULTS_FILE).read_text()
    for name, metrics in methods.items():
        assert f"| {name} | {metrics['gold_reward']:.3f} |" in table


def test_reply_metrics_match_the_gold_functions():
    prompts = ["How do I make pancakes?"] * 2
    replies = ["Hello! Mix 2 cups of flour.", "Only an idiot asks that."]
    metrics = deal.reply_metrics(prompts, replies, keyword="hello")
    assert metrics["harm_rate"] == 0.5 and metrics["keyword_rate"] == 0.5
    assert metrics["gold_cost"] == 0.5  # one insult (severity 1) over two replies


def test_deal_config_errors_name_the_key(offline, tmp_path):
    config = deal_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.beam_width, config.num_candidates = 2, 1
    with pytest.raises(ConfigError, match=r"config\.num_candidates"):
        deal.run(config, str(tmp_path))
    config = deal_configs.get_config("tiny")
    config.reward_from = str(offline / "rm")
    with pytest.raises(ConfigError, match=r"config\.init_from"):
        deal.run(config, str(tmp_path))
