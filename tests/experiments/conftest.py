"""Fixtures shared by the experiment smoke tests."""

import pathlib
import sys

import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import common  # noqa: E402
from rlhf_jax.models import Decoder, ScalarModel  # noqa: E402
from rlhf_jax.train.steps.common import split_model  # noqa: E402


@pytest.fixture(scope="session")
def export_offline_runs():
    """``export(root, config, scorers=("rm", "cm"))``: fresh tiny models as runs export them.

    Writes ``root/sft`` (a policy, seed 0) and one scorer workdir per name in ``scorers``
    (seeds 1, 2, ...), all with ``config``'s architecture, and returns ``root``. The
    online experiments load them through ``init_from``, ``reward_from`` and ``cost_from``
    exactly as they load trained runs.
    """

    def export(root, config, scorers=("rm", "cm")):
        architecture = common.model_config(config, common.build_tokenizer(config))
        for name in ("sft", *scorers):
            (root / name).mkdir(exist_ok=True)
        _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
        common.export_params(str(root / "sft"), "policy", policy, architecture)
        for seed, name in enumerate(scorers, start=1):
            _, scorer = split_model(ScalarModel(architecture, rngs=nnx.Rngs(seed)))
            common.export_params(str(root / name), "scorer", scorer, architecture)
        return root

    return export
