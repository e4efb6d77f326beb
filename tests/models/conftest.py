"""Fixtures of the model tests: tiny random checkpoints, noisy models, jitted forwards.

Test modules are imported with ``--import-mode=importlib``, so helpers reach them as
fixtures rather than imports.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig

VOCAB = 128
FAMILIES = ("llama", "qwen2", "gpt2")


def randomise_torch(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace every weight by noise so that biases and norm gains are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn(param.shape, generator=generator)
            is_norm_gain = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_gain else noise)
    return model.eval()


def hf_model(family: str) -> torch.nn.Module:
    """A 2-layer, width-64 random transformers model of ``family`` (float32)."""
    rope_common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "llama":
        # head_dim 24 != 64 / 4 pins that head width and model width are decoupled.
        config = transformers.LlamaConfig(head_dim=24, tie_word_embeddings=False, **rope_common)
        return randomise_torch(transformers.LlamaForCausalLM(config), seed=0)
    if family == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=True, **rope_common)
        return randomise_torch(transformers.Qwen2ForCausalLM(config), seed=1)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
    )
    return randomise_torch(transformers.GPT2LMHeadModel(config), seed=2)


def hf_logits(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray | None = None):
    """Logits of a transformers model; positions follow the mask, as in ``generate``
    (a plain transformers forward would count pads as positions)."""
    kwargs = {}
    if mask is not None:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        kwargs = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), **kwargs).logits.numpy()


def noisy_params(module_factory, seed: int = 0):
    """``(graphdef, params)`` of ``module_factory()`` with weights N(0, 0.1²) (norm gains
    1 + that): O(1) outputs, so tolerances mean something. Built abstractly and filled
    from numpy, so no initialiser is compiled."""
    graphdef, abstract = nnx.split(nnx.eval_shape(module_factory), nnx.Param)
    rng = np.random.RandomState(seed)
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        value = (1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.standard_normal(shape)
        leaves.append((path, variable.replace(jnp.asarray(value, dtype))))
    return graphdef, nnx.from_flat_state(leaves)


def noisy_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    """A :class:`Decoder` with :func:`noisy_params` weights."""
    return nnx.merge(*noisy_params(lambda: Decoder(config, rngs=nnx.Rngs(0)), seed))


def jitted_forward(model: Decoder):
    """``f(tokens, mask) -> logits`` (numpy), compiled once per input shape."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def forward(params, tokens, mask):
        logits, _ = nnx.merge(graphdef, params)(tokens, attention_mask=mask)
        return logits

    return lambda tokens, mask: np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask)))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """``family -> (torch model, checkpoint directory)`` for the three families."""
    models = {}
    for family in FAMILIES:
        model = hf_model(family)
        directory = tmp_path_factory.mktemp(f"hf_{family}")
        model.save_pretrained(directory, safe_serialization=True)
        models[family] = (model, directory)
    return models


@pytest.fixture(scope="session")
def prompt_batch():
    """A left-padded batch: row 0 has 10 real tokens, row 1 has 6 after 4 pads."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, size=(2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.int32)
    mask[1, :4] = 0
    tokens[1, :4] = 0
    return tokens, mask


@pytest.fixture(scope="session")
def hf_forward():
    """:func:`hf_logits`."""
    return hf_logits


@pytest.fixture(scope="session")
def make_noisy_params():
    """:func:`noisy_params`."""
    return noisy_params


@pytest.fixture(scope="session")
def make_noisy_decoder():
    """:func:`noisy_decoder`."""
    return noisy_decoder


@pytest.fixture(scope="session")
def make_forward():
    """:func:`jitted_forward`."""
    return jitted_forward
