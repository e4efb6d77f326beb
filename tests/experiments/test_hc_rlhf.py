"""End-to-end smoke test of experiments/hc_rlhf.py with the tiny preset.

The SFT policy, reward model and cost model are freshly initialised tiny models exported
by ``common.export_params`` (the layout the offline runs leave in their workdirs).
"""

import numpy as np
import pytest
from scipy import stats

from experiments import hc_rlhf
from experiments.configs import hc_rlhf as hc_configs
from rlhf_jax.objectives.hc_rlhf import NO_SOLUTION_FOUND, PASS
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl

TIGHT, LOOSE, MULTIPLIER_LR, INITIAL_MULTIPLIER = -100.0, 100.0, 0.01, 0.5


@pytest.fixture(scope="module")
def offline(tmp_path_factory, export_offline_runs):
    return export_offline_runs(tmp_path_factory.mktemp("offline"), hc_configs.get_config("tiny"))


def tiny_config(offline):
    config = hc_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.cost_from = str(offline / "cm")
    config.num_steps = 4
    config.eval_every = 4
    config.multiplier_lr = MULTIPLIER_LR
    config.initial_multiplier = INITIAL_MULTIPLIER
    return config


def test_hc_rlhf_reaches_both_verdicts(offline, tmp_path):
    config = tiny_config(offline)
    # A threshold far below any cost of the random cost model: the candidate cannot pass.
    config.cost_threshold = TIGHT
    summary = hc_rlhf.run(config, str(tmp_path))
    assert summary["verdict"] == NO_SOLUTION_FOUND and summary["policy"] is None
    assert not (tmp_path / "policy").exists() and (tmp_path / "candidate").is_dir()
    # The dual step runs on the pessimistic bound: λ_k = λ_{k−1} + α (U_cand,k − d), and
    # U_cand = mean + κ_s t s/√n_s is never below the mean cost (float32: rtol 1e-5).
    multiplier = INITIAL_MULTIPLIER
    for record in read_jsonl(tmp_path / JSONL_NAME):
        multiplier += MULTIPLIER_LR * (record["cost_bound"] - TIGHT)
        np.testing.assert_allclose(record["lambda"], multiplier, rtol=1e-5)
        assert record["cost_bound"] >= record["cost_score"]
    # The reported safety bound is the Student-t bound of the reported mean: its distance
    # to the threshold decides the verdict; its width is positive and finite.
    assert summary["safety_bound"] > summary["safety_cost_mean"] > TIGHT
    assert summary["safety_prompts"] == config.num_safety_prompts
    # The same candidate, tested against a loose threshold, passes and is returned.
    config.cost_threshold = LOOSE
    retest = hc_rlhf.run_safety_test(config, str(tmp_path))
    assert retest["verdict"] == PASS and (tmp_path / "policy").is_dir()
    # Same fixed sampler keys: the same replies and costs, so the same bound (the
    # threshold does not enter it).
    np.testing.assert_allclose(retest["safety_bound"], summary["safety_bound"], rtol=1e-6)
    # The bound's width matches scipy's Student-t quantile up to the unknown std:
    # width / t_{1-δ, n-1} · √n is the same for any δ, so the ratio of two widths is the
    # ratio of scipy quantiles (float32 bisection: rtol 1e-4).
    config.bound_delta = 0.01
    config.cost_threshold = TIGHT  # (a pass would export policy/ a second time)
    strict = hc_rlhf.run_safety_test(config, str(tmp_path))
    n = config.num_safety_prompts
    ratio = (strict["safety_bound"] - strict["safety_cost_mean"]) / (
        summary["safety_bound"] - summary["safety_cost_mean"]
    )
    expected = stats.t.ppf(0.99, n - 1) / stats.t.ppf(
        1 - hc_configs.get_config().bound_delta, n - 1
    )
    np.testing.assert_allclose(ratio, expected, rtol=1e-4)


def test_hc_rlhf_needs_enough_safety_prompts(offline, tmp_path):
    config = tiny_config(offline)
    config.num_safety_prompts = 100
    with pytest.raises(ConfigError, match=r"config\.num_safety_prompts"):
        hc_rlhf.run(config, str(tmp_path))
