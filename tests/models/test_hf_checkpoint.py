import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import (
    ModelConfig,
    build_decoder,
    config_to_hf,
    load_hf_checkpoint,
    load_hf_model,
    save_hf_checkpoint,
)

# Parity tolerance: both sides compute in float32 with the same weights; the only
# differences are summation order and the order of the softmax / RoPE operations, which
# on O(1) logits of a 2-layer model stay within a few float32 ulps (~1e-6). 1e-4 is the
# bound asked of an import and leaves two orders of magnitude of margin.
PARITY_ATOL = 1e-4
NEW_TOKENS = 16

FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def imported(hf_models, make_forward):
    """``family -> (model, jitted forward)`` imported from the saved checkpoints."""
    result = {}
    for family, (_, directory) in hf_models.items():
        model = load_hf_model(directory)
        result[family] = (model, make_forward(model))
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_left_padding(
    family, hf_models, imported, prompt_batch, hf_forward
):
    hf_model, _ = hf_models[family]
    tokens, mask = prompt_batch
    _, forward = imported[family]
    ours = forward(tokens, mask)
    reference = hf_forward(hf_model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference[real], atol=PARITY_ATOL, rtol=0)
    # The unpadded row also matches transformers' plain forward (default positions).
    np.testing.assert_allclose(ours[:1], hf_forward(hf_model, tokens[:1]), atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_generate(family, hf_models, imported, prompt_batch):
    hf_model, _ = hf_models[family]
    _, forward = imported[family]
    prompt, prompt_mask = prompt_batch
    B, P = prompt.shape
    # Causal attention: the logits at position t ignore whatever sits after t, so one
    # fixed-length buffer (one compilation) serves every step of the plain greedy loop.
    buffer = np.zeros((B, P + NEW_TOKENS), np.int32)
    buffer[:, :P] = prompt
    mask = np.ones_like(buffer)
    mask[:, :P] = prompt_mask
    for step in range(NEW_TOKENS):
        logits = forward(buffer, mask)
        buffer[:, P + step] = np.argmax(logits[:, P + step - 1], axis=-1)
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor(prompt, dtype=torch.long),
            attention_mask=torch.tensor(prompt_mask),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(buffer, generated)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trips_through_both_libraries(
    family, hf_models, imported, prompt_batch, tmp_path, hf_forward, make_forward
):
    hf_model, _ = hf_models[family]
    model, forward = imported[family]
    tokens, mask = prompt_batch
    save_hf_checkpoint(tmp_path, model.config, nnx.state(model, nnx.Param))
    # Our own import of the export: every parameter bit-identical, hence identical logits.
    config, params = load_hf_checkpoint(tmp_path)
    assert config == model.config
    original = nnx.state(model, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, params, original)
    np.testing.assert_array_equal(
        make_forward(build_decoder(config, params))(tokens, mask), forward(tokens, mask)
    )
    # transformers' import of the export: the same weights, so the same torch computation.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(hf_forward(reloaded, tokens), hf_forward(hf_model, tokens))


def test_sharded_checkpoints_import_and_export(
    hf_models, imported, prompt_batch, tmp_path, hf_forward, make_forward
):
    hf_model, _ = hf_models["qwen2"]
    tokens, mask = prompt_batch
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_hf_model(tmp_path / "hf")
    reference = hf_forward(hf_model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        make_forward(model)(tokens, mask)[real], reference[real], atol=PARITY_ATOL, rtol=0
    )

    save_hf_checkpoint(
        tmp_path / "ours", model.config, nnx.state(model, nnx.Param), max_shard_bytes=40_000
    )
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_array_equal(hf_forward(reloaded, tokens), hf_forward(hf_model, tokens))


def test_gpt2_fused_attention_is_split_into_q_k_v(hf_models):
    hf_model, directory = hf_models["gpt2"]
    model = load_hf_model(directory)
    fused = hf_model.transformer.h[0].attn.c_attn.weight.detach().numpy()  # [E, 3E], Conv1D
    E, H = 64, 4
    for index, projection in enumerate(
        (model.layers[0].attn.query, model.layers[0].attn.key, model.layers[0].attn.value)
    ):
        expected = fused[:, index * E : (index + 1) * E].reshape(E, H, E // H)
        np.testing.assert_array_equal(np.asarray(projection.kernel[...]), expected)


def test_bfloat16_parameters_export_and_reload(hf_models, tmp_path):
    _, directory = hf_models["llama"]
    config, params = load_hf_checkpoint(directory, param_dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    save_hf_checkpoint(tmp_path, config, params)
    reloaded_config, reloaded = load_hf_checkpoint(tmp_path, param_dtype="bfloat16")
    assert reloaded_config == config
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def _copy_checkpoint(directory, target, *, edit_config=None, edit_tensors=None):
    target.mkdir()
    config = json.loads((directory / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


def test_unknown_architecture_is_named(hf_models, tmp_path):
    _, directory = hf_models["llama"]
    bad = _copy_checkpoint(
        directory,
        tmp_path / "bad",
        edit_config=lambda c: c.update(architectures=["MistralForCausalLM"]),
    )
    with pytest.raises(
        ValueError, match=r"architectures=\['MistralForCausalLM'\].*LlamaForCausalLM"
    ):
        load_hf_checkpoint(bad)


def test_missing_tensor_is_named(hf_models, tmp_path):
    _, directory = hf_models["llama"]
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _copy_checkpoint(directory, tmp_path / "bad", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load_hf_checkpoint(bad)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_models, tmp_path):
    _, directory = hf_models["gpt2"]
    bad = _copy_checkpoint(directory, tmp_path / "bad", edit_config=lambda c: c.update(n_inner=200))
    with pytest.raises(
        ValueError,
        match=r"'transformer.h.0.mlp.c_proj.weight' has shape \(256, 64\), expected \(200, 64\)",
    ):
        load_hf_checkpoint(bad)


def test_unsupported_rope_scaling_is_named(hf_models, tmp_path):
    _, directory = hf_models["llama"]
    bad = _copy_checkpoint(
        directory,
        tmp_path / "bad",
        edit_config=lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
    )
    with pytest.raises(ValueError, match="rope type 'llama3'"):
        load_hf_checkpoint(bad)


def test_export_rejects_configs_outside_the_family_layout():
    config = ModelConfig.qwen2(
        vocab_size=16,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        mlp_hidden_size=8,
        attn_out_bias=True,
    )
    with pytest.raises(ValueError, match="attn_out_bias=True"):
        config_to_hf(config)
