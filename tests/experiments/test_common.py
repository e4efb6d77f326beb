import logging
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import common  # noqa: E402
from rlhf_jax.models import Decoder, ModelConfig  # noqa: E402
from rlhf_jax.train import loop  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402
from rlhf_jax.train.state import TrainState  # noqa: E402
from rlhf_jax.train.steps import make_sft_step  # noqa: E402

# The tests run with 8 fake CPU devices (tests/conftest.py).


def config_with_mesh(**mesh):
    config = common.base_config()
    config.mesh.update(mesh)
    return config


def test_default_mesh_is_data_parallel_over_every_device():
    assert common.mesh_sizes(common.base_config()) == (8, 1, 1)
    assert common.mesh_sizes(config_with_mesh(data=2, fsdp=-1, tensor=2)) == (2, 2, 2)


def test_mesh_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"config\.mesh\.data: got -2"):
        common.validate(config_with_mesh(data=-2), {})
    with pytest.raises(ConfigError, match=r"config\.mesh=.*multiply to 6, but there are 8"):
        common.validate(config_with_mesh(data=3, fsdp=2), {})


def test_a_batch_too_small_for_every_device_shrinks_only_a_free_data_axis(caplog):
    with caplog.at_level(logging.WARNING):
        mesh = common.build_mesh(config_with_mesh(tensor=2), batch_size=2)
    # data = -1 would be 4 with tensor = 2; a batch of 2 rows allows data = 2 only.
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert "4 of 8 devices idle" in caplog.text
    with pytest.raises(ConfigError, match=r"data \* fsdp = 8.*batch of 4 rows"):
        common.build_mesh(config_with_mesh(data=8), batch_size=4)
    with pytest.raises(ConfigError, match=r"data \* fsdp = 8.*batch of 6 rows"):
        common.build_mesh(config_with_mesh(data=-1, fsdp=4), batch_size=6)


MODEL = ModelConfig.llama(
    vocab_size=64,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_hidden_size=64,
    max_position_embeddings=12,
)


def sft_pieces():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, MODEL.vocab_size, (16, 12)).astype(np.int32)
    arrays = {
        "input_ids": tokens,
        "attention_mask": np.ones_like(tokens),
        "positions": np.tile(np.arange(12, dtype=np.int32), (16, 1)),
        "loss_mask": np.ones_like(tokens),
    }
    graphdef, params = nnx.split(Decoder(MODEL, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.5)
    state = TrainState.create(params, tx, rng=0)
    schedule = loop.EpochPermutationSchedule(arrays, batch_size=8)
    return make_sft_step(graphdef, tx), state, schedule


def test_train_on_an_fsdp_and_tensor_mesh_matches_the_unsharded_loop(tmp_path):
    config = config_with_mesh(data=1, fsdp=-1, tensor=2)
    config.update(num_steps=2, checkpoint_every=2, log_every=1)
    step, state, schedule = sft_pieces()
    sharded, _, history = common.train(step, state, schedule, config, str(tmp_path / "mesh"))
    # The state came back laid out on the (1, 4, 2) mesh: the [64, 32] embedding split
    # 2 ways by vocabulary (tensor) and 4 ways by width (fsdp).
    embedding = sharded.params["token_embedding"]
    assert embedding.addressable_shards[0].data.shape == (32, 8)
    assert len(embedding.sharding.device_set) == 8

    step, state, schedule = sft_pieces()
    plain, _ = loop.run(
        step,
        state,
        schedule,
        num_steps=2,
        workdir=tmp_path / "plain",
        checkpoint_every=2,
        progress=False,
    )
    # The same two SGD steps; only the reduction order differs: f32 ulps (see
    # tests/parallel/test_steps.py for the reasoning behind 1e-5).
    assert [record["step"] for record in history] == [1, 2]
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_exporting_again_replaces_the_earlier_export(tmp_path):
    architecture = ModelConfig.llama(
        vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=16
    )
    _, first = nnx.split(Decoder(architecture, rngs=nnx.Rngs(0)))
    _, second = nnx.split(Decoder(architecture, rngs=nnx.Rngs(1)))
    common.export_params(str(tmp_path), "policy", first, architecture)
    common.export_params(str(tmp_path), "policy", second, architecture)
    restored = common.import_params(str(tmp_path), "policy", first)
    jax.tree.map(np.testing.assert_array_equal, restored, second)
