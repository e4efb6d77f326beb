import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import fdpg  # noqa: E402
from experiments.configs import fdpg as fdpg_config  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402


@pytest.fixture
def fdpg_run_config(tiny_online_config):
    def make(num_steps):
        config = tiny_online_config(fdpg_config.get_config(), num_steps)
        config.beta = 0.01  # a target far from the reference for a reward model this weak
        return config

    return make


def test_fdpg_moves_the_policy_toward_the_reward_tilted_target(tmp_path, fdpg_run_config):
    summary = fdpg.run(fdpg_run_config(12), str(tmp_path))
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


def test_fdpg_settings_are_checked(tmp_path, fdpg_run_config):
    config = fdpg_run_config(1)
    config.temperature = 0.7
    with pytest.raises(ConfigError, match=r"config\.temperature=0\.7"):
        fdpg.run(config, str(tmp_path))
