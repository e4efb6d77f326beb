"""Tokenizers, preference-data builders, the embedded task and batching."""
