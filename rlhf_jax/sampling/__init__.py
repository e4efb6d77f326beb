"""Jitted KV-cache sampling, including sampling from combinations of several models."""
