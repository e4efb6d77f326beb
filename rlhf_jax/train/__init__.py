"""Training state, pure step builders, checkpointing, metrics and the loop driver."""
