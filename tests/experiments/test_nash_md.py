"""End-to-end smoke test of experiments/nash_md.py (oracle preferences) with the tiny preset.

The SFT policy is exported by ``common.export_params`` from a freshly initialised tiny
decoder (the layout an SFT run leaves in its workdir).
"""

import numpy as np
import pytest
from flax import nnx

from experiments import common, nash_md
from experiments.configs import nash_md as nash_configs
from rlhf_jax.models import Decoder
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.steps.common import split_model


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    config = nash_configs.get_config("tiny")
    architecture = common.model_config(config, common.build_tokenizer(config))
    (root / "sft").mkdir()
    _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
    common.export_params(str(root / "sft"), "policy", policy, architecture)
    return root / "sft"


def test_nash_md_with_the_host_oracle_runs_and_logs(sft_workdir, tmp_path):
    config = nash_configs.get_config("tiny")
    config.init_from = str(sft_workdir)
    config.num_steps = 4
    config.eval_every = 2
    summary = nash_md.run(config, str(tmp_path))
    records = read_jsonl(tmp_path / JSONL_NAME)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        # Oracle probabilities are σ(·) of finite margins: strictly inside (0, 1).
        assert 0.0 < record["preference"] < 1.0
        assert not record["nonfinite"]
    # The first batch is sampled from π = μ (same parameters): the KL estimate is 0.
    assert abs(records[0]["kl"]) < 1e-5
    assert records[-1]["kl"] != 0.0  # the policy moved away from the reference
    assert [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
    assert np.isfinite(summary["eval_gold_reward"])
    assert (tmp_path / "policy").is_dir()


def test_reward_model_preference_requires_reward_from(tmp_path):
    config = nash_configs.get_config("tiny")
    config.preference = "reward_model"
    with pytest.raises(ConfigError, match=r"config\.reward_from"):
        nash_md.run(config, str(tmp_path))
