"""Link functions shared by the preference objectives."""

import jax
from jax import Array


def logistic_loss(z: Array) -> Array:
    """``ℓ(z) = −log σ(z)``, the logistic (Bradley–Terry) loss of a margin ``z``.

    Computed as ``−log_sigmoid(z)``, which stays finite for large ``|z|``.
    """
    return -jax.nn.log_sigmoid(z)
