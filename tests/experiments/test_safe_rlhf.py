"""End-to-end smoke test of experiments/safe_rlhf.py with the tiny preset.

The SFT policy, reward model and cost model are exported by ``common.export_params`` from
freshly initialised tiny models (the layout the offline runs leave in their workdirs).
"""

import numpy as np
import pytest

from experiments import safe_rlhf
from experiments.configs import safe_rlhf as safe_configs
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl


@pytest.fixture(scope="module")
def offline(tmp_path_factory, export_offline_runs):
    return export_offline_runs(tmp_path_factory.mktemp("offline"), safe_configs.get_config("tiny"))


def test_safe_rlhf_multiplier_tracks_the_constraint(offline, tmp_path):
    config = safe_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.cost_from = str(offline / "cm")
    config.num_steps = 4
    config.eval_every = 4
    # A threshold far below any cost of the random cost model: the constraint is
    # violated at every step, so λ must grow by α (Ĵ_C − d) each step.
    config.cost_threshold = -100.0
    config.multiplier_lr = 0.01
    config.initial_multiplier = 0.5
    summary = safe_rlhf.run(config, str(tmp_path))
    records = read_jsonl(tmp_path / JSONL_NAME)
    multiplier = 0.5
    for record in records:
        multiplier += 0.01 * (record["cost_score"] + 100.0)
        np.testing.assert_allclose(record["lambda"], multiplier, rtol=1e-5)
    assert summary["steps"] == 4
    for key in ("eval_gold_reward", "eval_gold_cost", "eval_reward_score", "eval_cost_score"):
        assert np.isfinite(summary[key])
    # The policy starts as the reference: the k1 KL estimate is exactly 0 before training.
    assert summary["eval_kl_initial"] == 0.0 and np.isfinite(summary["eval_kl"])
    assert (tmp_path / "policy").is_dir()


def test_safe_rlhf_requires_a_cost_model(offline, tmp_path):
    config = safe_configs.get_config("tiny")
    config.reward_from = str(offline / "rm")
    with pytest.raises(ConfigError, match=r"config\.cost_from"):
        safe_rlhf.run(config, str(tmp_path))
