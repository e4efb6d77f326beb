"""Tokenizers, preference-data builders, the embedded task and batching.

The TFDS builders live in :mod:`rlhf_jax.data.builders` (importing them loads
``tensorflow_datasets``, not TensorFlow); everything else is importable from here.
"""

from rlhf_jax.data.batching import (
    LengthReport,
    bucket_length,
    default_buckets,
    pack_sequences,
    pad_preference_pairs,
    pad_prompt_responses,
    pad_prompts_left,
)
from rlhf_jax.data.chat import (
    RenderedChat,
    Turn,
    format_anthropic,
    parse_anthropic,
    render_chat,
    render_prompt,
    render_response,
    split_final_assistant,
)
from rlhf_jax.data.errors import DataError, ErrorPolicy, IssueLog, OnError, Reason
from rlhf_jax.data.tokenizers import (
    ROLE_MARKERS,
    ROLES,
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

__all__ = [
    "ROLES",
    "ROLE_MARKERS",
    "ByteTokenizer",
    "DataError",
    "ErrorPolicy",
    "HuggingFaceTokenizer",
    "IssueLog",
    "LengthReport",
    "OnError",
    "Reason",
    "RenderedChat",
    "SentencePieceTokenizer",
    "Tokenizer",
    "Turn",
    "bucket_length",
    "default_buckets",
    "format_anthropic",
    "pack_sequences",
    "pad_preference_pairs",
    "pad_prompt_responses",
    "pad_prompts_left",
    "parse_anthropic",
    "render_chat",
    "render_prompt",
    "render_response",
    "split_final_assistant",
]
