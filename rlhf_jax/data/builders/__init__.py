"""TFDS builders for real preference formats, read from local files into array_record.

Build with :func:`prepare` (or ``builder.download_and_prepare()``) and read without
TensorFlow through ``builder.as_data_source()[split]``; :func:`to_text` turns the bytes of
Text features into ``str``.
"""

from rlhf_jax.data.builders.hh_rlhf import AnthropicHhRlhf
from rlhf_jax.data.builders.local_builder import LocalBuilder, prepare, to_text
from rlhf_jax.data.builders.pku_safe_rlhf import PkuSafeRlhf
from rlhf_jax.data.builders.qa_feedback import (
    ERROR_TYPES,
    QaFeedback,
    bundled_dev_dir,
    copeland_ranks,
    error_token_labels,
    span_token_labels,
)
from rlhf_jax.data.builders.summarize_from_feedback import SummarizeFromFeedback, tldr_prompt
from rlhf_jax.data.builders.ultrafeedback import UltraFeedback, fine_grained_score

__all__ = [
    "ERROR_TYPES",
    "AnthropicHhRlhf",
    "LocalBuilder",
    "PkuSafeRlhf",
    "QaFeedback",
    "SummarizeFromFeedback",
    "UltraFeedback",
    "bundled_dev_dir",
    "copeland_ranks",
    "error_token_labels",
    "fine_grained_score",
    "prepare",
    "span_token_labels",
    "tldr_prompt",
    "to_text",
]
