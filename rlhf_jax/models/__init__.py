"""Flax NNX decoder language models, scalar heads, log-probs and checkpoint import/export."""
