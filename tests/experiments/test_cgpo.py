"""End-to-end smoke test of experiments/cgpo.py with the tiny preset (CRPG, three judges).

The SFT policy, reward model and cost model are freshly initialised tiny models exported
by ``common.export_params`` (the layout the offline runs leave in their workdirs).
"""

import numpy as np
import pytest

from experiments import cgpo
from experiments.configs import cgpo as cgpo_configs
from rlhf_jax.data.embedded_task import HARM_MARKERS
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl


@pytest.fixture(scope="module")
def offline(tmp_path_factory, export_offline_runs):
    return export_offline_runs(tmp_path_factory.mktemp("offline"), cgpo_configs.get_config("tiny"))


def test_cgpo_raises_the_reward_without_raising_violations(offline, tmp_path):
    config = cgpo_configs.get_config("tiny")
    config.init_from = str(offline / "sft")
    config.reward_from = str(offline / "rm")
    config.cost_from = str(offline / "cm")
    config.cost_judge_threshold = 0.3  # about the random cost model's median score
    config.eval_every = 8  # evaluations at steps 0 and 8 only
    summary = cgpo.run(config, str(tmp_path))
    records = read_jsonl(tmp_path / JSONL_NAME)
    # The evaluations sample the same 8 held-out prompts with the same keys before and
    # after training, so their difference is the policy's (the training means move
    # with each step's 8 prompts and are too noisy to compare). CRPG must raise the
    # reward-model score it optimises (measured +0.17 on this seeded run) and, since
    # replies the cost judge flags get no weight, lower the judged cost-model score
    # (measured −0.35).
    assert summary["eval_reward_score"] > summary["eval_reward_score_initial"] + 0.05, summary
    assert summary["eval_cost_score"] < summary["eval_cost_score_initial"] - 0.1, summary
    for record in records:  # the mixture flags at least what each judge flags
        judged = [v for k, v in record.items() if k.endswith("_violation_rate")]
        assert set(k for k in record if k.endswith("_violation_rate")) == {
            "banned_violation_rate",
            "cost_violation_rate",
        }
        assert max(judged) <= record["violation_rate"] <= sum(judged) + 1e-6
    assert summary["steps"] == 8 and (tmp_path / "policy").is_dir()
    assert np.isfinite(summary["eval_cost_score"]) and np.isfinite(summary["eval_gold_reward"])


def test_harm_marker_judge_covers_every_marker():
    sequences = cgpo.harm_marker_sequences(ByteTokenizer())
    markers = {w for group in HARM_MARKERS.values() for w in group}
    # Each marker, as written and capitalised (duplicates merged when identical).
    assert len(sequences) == len({v for w in markers for v in (w, w.capitalize())})
    decoded = {ByteTokenizer().decode(np.asarray(s)) for s in sequences}
    assert markers <= decoded


def test_cgpo_config_names_a_bad_algorithm(offline, tmp_path):
    config = cgpo_configs.get_config("tiny")
    config.reward_from = str(offline / "rm")
    config.algorithm = "ppo"
    with pytest.raises(ConfigError, match=r"config\.algorithm"):
        cgpo.run(config, str(tmp_path))
