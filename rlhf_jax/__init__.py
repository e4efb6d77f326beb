"""rlhf-jax: reinforcement learning from human feedback as pure JAX functions.

Layers (imports point downward only): ``train`` -> ``parallel`` / ``sampling`` ->
``models`` / ``data`` -> ``objectives``; ``tabular`` builds on ``objectives`` and is the
harness that checks every objective against its closed form.
"""

__version__ = "0.1.0"
