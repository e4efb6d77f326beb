"""MORLHF vs MODPO: the MODPO-as-DPO identity, the weighted scorer, and a tiny end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import morlhf
from experiments.configs import morlhf as morlhf_configs
from rlhf_jax.objectives.modpo import modpo_loss
from rlhf_jax.objectives.pairwise import PAIRWISE_LOSSES
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl


@pytest.mark.parametrize("weight", [0.2, 0.5, 1.0])
def test_dpo_on_shifted_reference_is_the_modpo_loss(weight):
    """DPO with β/w on reference log-probs shifted by (1 − w) r_m / β equals MODPO's loss
    with margin reward r_m of weight 1 − w (an independent implementation)."""
    keys = jax.random.split(jax.random.key(0), 6)
    policy_c, policy_r, ref_c, ref_r = (jax.random.normal(k, (16,)) * 3 for k in keys[:4])
    margin_c, margin_r = (jax.random.normal(k, (16,)) for k in keys[4:])
    beta = 0.1
    expected, _ = modpo_loss(
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        margin_c[:, None],
        margin_r[:, None],
        margin_weights=jnp.asarray([1.0 - weight]),
        preference_weight=weight,
        beta=beta,
    )
    shifted = [
        morlhf.modpo_reference_shift(ref, margin, margin_weight=1.0 - weight, beta=beta)
        for ref, margin in ((ref_c, margin_c), (ref_r, margin_r))
    ]
    loss, _ = PAIRWISE_LOSSES["dpo"](policy_c, policy_r, *shifted, beta=beta / weight)
    # Float32 re-association of the same sums: a few ulps of values of order 1.
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def offline(tmp_path_factory, export_offline_runs):
    return export_offline_runs(
        tmp_path_factory.mktemp("offline"), morlhf_configs.get_config("tiny")
    )


def test_weighted_scorer_scores_the_weighted_sum(offline):
    config = morlhf_configs.get_config("tiny")
    config.reward_from, config.cost_from = str(offline / "rm"), str(offline / "cm")
    reward, cost = morlhf.scorer_modules(config)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 1, 200)
    mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6], [3]]), jnp.int32)
    scorer = morlhf.WeightedScorer(reward, cost, 0.3)
    expected = 0.3 * reward.score(tokens, mask) - 0.7 * cost.score(tokens, mask)
    # The same float32 forward passes, combined per token before the last-token read-out.
    np.testing.assert_allclose(scorer.score(tokens, mask), expected, rtol=1e-5, atol=1e-6)


def test_morlhf_experiment_writes_the_front_and_table(offline, tmp_path):
    config = morlhf_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.cost_from = str(offline / "cm")
    summary = morlhf.run(config, str(tmp_path))
    rows = summary["rows"]
    assert list(rows) == ["SFT", "MORLHF w=0.5", "MODPO w=0.5", "MORLHF w=1", "MODPO w=1"]
    for row in rows.values():
        for key in ("gold_reward", "gold_cost", "harm_rate", "reward_score", "cost_score"):
            assert np.isfinite(row[key])
    # Each row comes from its own run: MODPO wrote its training log, PPO its own.
    for name in ("morlhf_w0.5", "modpo_w0.5", "morlhf_w1", "modpo_w1"):
        assert len(read_jsonl(tmp_path / name / JSONL_NAME)) == 2
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["rows"] == rows
    table = (tmp_path / morlhf.RESULTS_FILE).read_text()
    for name, row in rows.items():
        assert f"| {name} |" in table and f"{row['gold_reward']:.3f}" in table
    assert (tmp_path / morlhf.PLOT_FILE).stat().st_size > 0
