"""End-to-end smoke test of experiments/nash_md.py (oracle preferences) with the tiny preset.

The SFT policy is exported by ``common.export_params`` from a freshly initialised tiny
decoder (the layout an SFT run leaves in its workdir).
"""

import itertools

import chex
import numpy as np
import pytest
from flax import nnx

from experiments import common, nash_md
from experiments.configs import nash_md as nash_configs
from rlhf_jax.models import Decoder
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.judge import make_lm_judge


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    config = nash_configs.get_config("tiny")
    architecture = common.model_config(config, common.build_tokenizer(config))
    (root / "sft").mkdir()
    _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
    common.export_params(str(root / "sft"), "policy", policy, architecture)
    return root / "sft"


class OracleCrashError(RuntimeError):
    """The oracle's process dying mid-run."""


def crash_after(num_calls, oracle):
    """``oracle`` that raises on its call number ``num_calls`` (0-based)."""
    calls = itertools.count()

    def crashing(*args, **kwargs):
        if next(calls) == num_calls:
            raise OracleCrashError(f"oracle call {num_calls}")
        return oracle(*args, **kwargs)

    return crashing


def test_nash_md_with_the_host_oracle_resumes_exactly_and_learns(
    sft_workdir, tmp_path, monkeypatch
):
    config = nash_configs.get_config("tiny")
    config.init_from = str(sft_workdir)
    config.num_steps = 4
    config.eval_every = 2  # a checkpoint at the end of each segment: step 2
    # The oracle labels batch_size pairs a step: it dies on the first pair of step 3.
    with monkeypatch.context() as patch:
        crashing = crash_after(2 * config.batch_size, nash_md.nontransitive_preference)
        patch.setattr(nash_md, "nontransitive_preference", crashing)
        with pytest.raises(OracleCrashError):
            nash_md.run(config, str(tmp_path / "cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["2"]

    summary = nash_md.run(config, str(tmp_path / "cut"))
    assert summary["resumed"] and summary["start_step"] == 2 and summary["steps"] == 4
    assert [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
    records = read_jsonl(tmp_path / "cut" / JSONL_NAME)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # every step logged once
    for record in records:
        # Oracle probabilities are σ(·) of finite margins: strictly inside (0, 1).
        assert 0.0 < record["preference"] < 1.0
        assert not record["nonfinite"]
    # The first batch is sampled from π = μ (same parameters): the KL estimate is 0.
    assert abs(records[0]["kl"]) < 1e-5
    assert records[-1]["kl"] != 0.0  # the policy moved away from the reference
    # Held-out KL of the initial policy, which is the reference: the same forward pass
    # on the same samples, so exactly 0.
    assert summary["eval_kl_initial"] == 0.0
    assert np.isfinite(summary["eval_kl"]) and np.isfinite(summary["eval_gold_reward"])

    # An uninterrupted run ends with the same policy, metrics and evaluations, bit for
    # bit: the restored state equals the saved one, and the same compiled pieces see
    # the same batches, keys and oracle labels (XLA on CPU is deterministic).
    whole = nash_md.run(config, str(tmp_path / "whole"))
    assert not whole["resumed"] and whole["start_step"] == 0
    assert summary["evaluations"] == whole["evaluations"]
    assert records == read_jsonl(tmp_path / "whole" / JSONL_NAME)
    _, like = split_model(
        Decoder(common.model_config(config, common.build_tokenizer(config)), rngs=nnx.Rngs(1))
    )
    chex.assert_trees_all_equal(
        common.import_params(str(tmp_path / "cut"), "policy", like),
        common.import_params(str(tmp_path / "whole"), "policy", like),
    )


def test_reward_model_preference_requires_reward_from(tmp_path):
    config = nash_configs.get_config("tiny")
    config.preference = "reward_model"
    with pytest.raises(ConfigError, match=r"config\.reward_from"):
        nash_md.run(config, str(tmp_path))


def test_lm_judge_preference_labels_every_pair(sft_workdir, tmp_path, monkeypatch):
    config = nash_configs.get_config("tiny")
    config.init_from = config.judge_from = str(sft_workdir)
    config.preference = "judge"
    config.num_steps = config.eval_every = 1
    config.batch_size = 4  # host-side judging is two forwards per pair: keep it small
    calls = []

    def recording_judge(*args, **kwargs):
        judge = make_lm_judge(*args, **kwargs)

        def record(prompt, a, b):
            calls.append(judge(prompt, a, b))
            return calls[-1]

        return record

    monkeypatch.setattr(nash_md, "make_lm_judge", recording_judge)
    summary = nash_md.run(config, str(tmp_path))
    assert summary["steps"] == 1
    # The judge, and nothing else, labels each of the batch_size pairs of every step.
    assert len(calls) == config.num_steps * config.batch_size
    records = read_jsonl(tmp_path / JSONL_NAME)
    for record, labels in zip(records, np.split(np.asarray(calls), config.num_steps), strict=True):
        assert np.all((labels > 0.0) & (labels < 1.0))
        # The step's preference metric is the mean of the judge's labels (f32 vs f64).
        np.testing.assert_allclose(record["preference"], labels.mean(), rtol=1e-5)


def test_judge_preference_requires_judge_from(tmp_path):
    config = nash_configs.get_config("tiny")
    config.preference = "judge"
    with pytest.raises(ConfigError, match=r"config\.judge_from"):
        nash_md.run(config, str(tmp_path))
