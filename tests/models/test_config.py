import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, preset
from rlhf_jax.models.config import PRESET_NAMES

BASE = dict(
    architecture="llama",
    vocab_size=32,
    hidden_size=16,
    num_layers=1,
    num_heads=4,
    mlp_hidden_size=32,
)


def test_derived_fields_default_from_the_width():
    config = ModelConfig(**BASE)
    assert config.head_dim == 4 and config.num_kv_heads == 4 and config.num_groups == 1
    gqa = ModelConfig(**{**BASE, "num_kv_heads": 2, "head_dim": 8})
    assert gqa.head_dim == 8 and gqa.num_groups == 2


def test_family_constructors_set_the_family_switches():
    gpt2 = ModelConfig.gpt2(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2)
    assert (gpt2.norm, gpt2.position, gpt2.activation) == ("layernorm", "learned", "gelu_tanh")
    assert gpt2.qkv_bias and gpt2.attn_out_bias and gpt2.mlp_bias and gpt2.tie_embeddings
    assert gpt2.mlp_hidden_size == 64
    qwen = ModelConfig.qwen2(**{k: v for k, v in BASE.items() if k != "architecture"})
    assert qwen.qkv_bias and not qwen.attn_out_bias and not qwen.mlp_bias
    llama = ModelConfig.llama(**{k: v for k, v in BASE.items() if k != "architecture"})
    assert not (llama.qkv_bias or llama.attn_out_bias or llama.mlp_bias or llama.tie_embeddings)


@pytest.mark.parametrize(
    ("name", "published_count"),
    [
        # Parameter counts of the released checkpoints (GPT-2 small, Radford et al. 2019;
        # Qwen2-0.5B, Qwen Team 2024; TinyLlama-1.1B, Zhang et al. 2024).
        ("gpt2-124m", 124_439_808),
        ("qwen2-0.5b", 494_032_768),
        ("tinyllama-1.1b", 1_100_048_384),
    ],
)
def test_presets_have_the_published_parameter_counts(name, published_count):
    config = preset(name)
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == published_count


def test_preset_overrides_and_unknown_name():
    assert "llama-tiny" in PRESET_NAMES
    assert preset("qwen2-0.5b", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="preset name='nope'"):
        preset("nope")


def test_dtypes_are_normalised_to_names():
    config = ModelConfig(**BASE, dtype=jnp.bfloat16, param_dtype="float32")
    assert config.dtype == "bfloat16" and config.param_dtype == "float32"
    hash(config)  # frozen and hashable: usable as static jit metadata


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"num_heads": 3}, "num_heads", "3"),
        ({"num_kv_heads": 3}, "num_kv_heads", "3"),
        ({"architecture": "mistral"}, "architecture", "'mistral'"),
        ({"norm": "batchnorm"}, "norm", "'batchnorm'"),
        ({"position": "alibi"}, "position", "'alibi'"),
        ({"activation": "relu"}, "activation", "'relu'"),
        ({"vocab_size": 0}, "vocab_size", "0"),
        ({"hidden_size": -16}, "hidden_size", "-16"),
        ({"num_layers": 0}, "num_layers", "0"),
        ({"mlp_hidden_size": 0}, "mlp_hidden_size", "0"),
        ({"max_position_embeddings": 0}, "max_position_embeddings", "0"),
        ({"head_dim": 3, "position": "rope"}, "head_dim", "3"),
        ({"norm_eps": 0.0}, "norm_eps", "0.0"),
        ({"rope_theta": -1.0}, "rope_theta", "-1.0"),
        ({"dtype": "int8"}, "dtype", "'int8'"),
    ],
)
def test_bad_config_error_names_field_value_and_expectation(changes, field, value):
    with pytest.raises(ValueError, match="expected") as error:
        ModelConfig(**{**BASE, **changes})
    assert f"ModelConfig.{field}={value}" in str(error.value)
