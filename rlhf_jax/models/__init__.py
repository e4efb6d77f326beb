"""Flax NNX decoder language models, scalar heads, log-probs and checkpoint import/export.

Public API:

- :class:`ModelConfig` (``.llama``, ``.qwen2``, ``.gpt2`` constructors) and :func:`preset`:
  one frozen, validated config for the Llama, Qwen2 and GPT-2 families.
- :class:`Decoder` ``(config, *, rngs)``: ``model(tokens, *, positions, attention_mask,
  cache, cache_index) -> (logits [B, T, V] f32, KVCache | None)``;
  ``model.init_cache(batch_size, max_length) -> KVCache``; ``model.hidden(tokens, ...)``
  for scalar heads; ``model.logits_from_hidden(hidden)``. Every parameter carries logical
  axis names (``'vocab'``, ``'embed'``, ``'mlp'``, ``'heads'``, ``'kv_heads'``,
  ``'head_dim'``) readable with ``nnx.get_partition_spec(nnx.state(model))``.
- :class:`KVCache`: per-layer ``[B, S, K, D]`` key and value arrays.
- :class:`ScalarModel`, :class:`PolicyWithValueHead`, :func:`sequence_score`: value,
  reward and cost models.
- :func:`token_logprobs`, :func:`response_logprobs`, :func:`sequence_logprobs`: per-token
  and per-sequence log-probabilities of (prompt, response) batches.
- :func:`load_hf_checkpoint`, :func:`load_hf_model`, :func:`build_decoder`,
  :func:`save_hf_checkpoint`, :func:`config_from_hf`, :func:`config_to_hf`: Hugging Face
  safetensors import and export.
- :mod:`~rlhf_jax.models.merging`: weighted merges, interpolation and task vectors of
  parameter trees, and the two-stage Balanced Actor Initialization merge.
"""

from rlhf_jax.models.config import ModelConfig, preset
from rlhf_jax.models.heads import (
    PolicyWithValueHead,
    ScalarHead,
    ScalarModel,
    last_token_index,
    sequence_score,
)
from rlhf_jax.models.hf_checkpoint import (
    build_decoder,
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    load_hf_model,
    save_hf_checkpoint,
)
from rlhf_jax.models.logprobs import response_logprobs, sequence_logprobs, token_logprobs
from rlhf_jax.models.transformer import Decoder, KVCache, default_positions

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "PolicyWithValueHead",
    "ScalarHead",
    "ScalarModel",
    "build_decoder",
    "config_from_hf",
    "config_to_hf",
    "default_positions",
    "last_token_index",
    "load_hf_checkpoint",
    "load_hf_model",
    "preset",
    "response_logprobs",
    "save_hf_checkpoint",
    "sequence_logprobs",
    "sequence_score",
    "token_logprobs",
]
