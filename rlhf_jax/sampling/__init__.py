"""Jitted KV-cache sampling, including sampling from combinations of several models.

Public API:

- ``SamplingConfig(max_new_tokens, eos_id, pad_id=0, temperature=1.0, top_k=0,
  top_p=1.0, greedy=False)``: static, hashable settings (keyword-only; ``eos_id=None``
  never stops early); one compilation per config.
- ``sample(graphdef, params, prompt_tokens, prompt_mask, rng, *, config) -> SampleOutput``:
  jitted sampling from one ``(graphdef, params)`` model given left-padded prompts
  ``[B, P]``.
- ``sample_combined(graphdefs, params, weights, prompt_tokens, prompt_mask, rng, *,
  config) -> SampleOutput``: jitted sampling from ``log_softmax(Σ_i w_i ·
  log_softmax(logits_i))``, each model with its own cache; weights ``(1 - β, β)`` over
  (policy, reference) give Nash-MD's geometric mixture.
- ``SampleOutput``: ``tokens``, ``attention_mask``, ``response_mask``, ``logprobs``, all
  ``[B, P + max_new_tokens]`` with the prompt then the response; ``logprobs[b, t]`` is
  ``log q(tokens[b, t] | tokens[b, <t])`` on response tokens (up to and including EOS)
  and 0 elsewhere.
- ``combine_logits(logits, weights)``, ``sampling_log_probs(scores, *, temperature,
  top_k, top_p)``, ``top_k_mask(log_probs, k)``, ``top_p_mask(log_probs, p)``: the pure
  per-step distribution functions the sampler uses.
"""

from rlhf_jax.sampling.processing import (
    combine_logits,
    sampling_log_probs,
    top_k_mask,
    top_p_mask,
)
from rlhf_jax.sampling.sampler import SampleOutput, SamplingConfig, sample, sample_combined

__all__ = [
    "SampleOutput",
    "SamplingConfig",
    "combine_logits",
    "sample",
    "sample_combined",
    "sampling_log_probs",
    "top_k_mask",
    "top_p_mask",
]
