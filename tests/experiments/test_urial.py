"""Smoke test of experiments/urial.py (tiny preset) and checks of its pretraining corpus."""

import json

import numpy as np
import pytest
from flax import nnx

from experiments import common, urial
from experiments.configs import urial as urial_configs
from rlhf_jax.data.embedded_task import gold_cost, reward_breakdown
from rlhf_jax.models import Decoder
from rlhf_jax.train.steps.common import split_model


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A workdir with a freshly initialised tiny policy, as an SFT run exports it."""
    root = tmp_path_factory.mktemp("sft")
    config = urial_configs.get_config("tiny")
    config.max_length = 64
    architecture = common.model_config(config, common.build_tokenizer(config))
    _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
    common.export_params(str(root), "policy", policy, architecture)
    return root


def test_urial_experiment_writes_the_three_rows(sft_dir, tmp_path):
    config = urial_configs.get_config("tiny")
    config.init_from = str(sft_dir)
    summary = urial.run(config, str(tmp_path))
    assert list(summary["methods"]) == ["base", "base + URIAL", "SFT"]
    for metrics in summary["methods"].values():
        for key in ("gold_reward", "gold_cost", "harm_rate", "rude_rate"):
            assert np.isfinite(metrics[key])
    assert np.isfinite(summary["pretrain_loss_last"])
    assert len(summary["examples"]) == config.num_examples
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["methods"]["SFT"]["harm_rate"] == summary["methods"]["SFT"]["harm_rate"]
    table = (tmp_path / urial.RESULTS_FILE).read_text()
    for name, metrics in summary["methods"].items():
        assert f"| {name} | {metrics['gold_reward']:.3f} |" in table
    assert (tmp_path / "base" / "policy").is_dir()


def test_pretraining_documents_keep_one_persona_per_document():
    config = urial_configs.get_config("tiny")
    config.num_documents, config.max_exchanges = 40, 3
    config.aligned_fraction, config.unaligned_fraction = 0.5, 0.5  # no mixed documents
    task = common.build_task(config)
    documents = urial.pretraining_documents(np.random.default_rng(0), task.train_prompts, config)
    for turns in documents:
        pairs = list(zip(turns[::2], turns[1::2], strict=True))
        aligned = [urial.fits_persona(q, a, "aligned") for (_, q), (_, a) in pairs]
        assert all(aligned) or not any(aligned)
        for (_, q), (_, a) in pairs:
            bad = gold_cost(q, a) > 0 or reward_breakdown(q, a).rudeness > 0
            assert bad != aligned[0]
