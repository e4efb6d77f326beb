"""Pure RLHF losses and estimators over arrays (no models, no data, no I/O)."""
