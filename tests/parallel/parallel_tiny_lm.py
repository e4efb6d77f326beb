"""A tiny next-token model and training step shared by the parallel tests and their worker.

The model names its parameter axes with the same logical names as the project's decoder
('vocab', 'embed', 'mlp', 'heads', 'head_dim') so that the sharding rules are exercised on
every kind of weight. Everything here is written independently of rlhf_jax.parallel: the
tests check rlhf_jax.parallel against it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB, EMBED, HEADS, HEAD_DIM, MLP, SEQ = 64, 16, 8, 4, 32, 8
BATCH = 8


def _init(axes, init=None):
    return nnx.with_partitioning(init or nnx.initializers.normal(0.2), axes)


class TinyLM(nnx.Module):
    """Embedding -> one attention block -> one MLP -> untied unembedding."""

    def __init__(self, *, rngs):
        self.embed = nnx.Param(_init(("vocab", "embed"))(rngs.params(), (VOCAB, EMBED)))
        self.query = nnx.Param(
            _init(("embed", "heads", "head_dim"))(rngs.params(), (EMBED, HEADS, HEAD_DIM))
        )
        self.key = nnx.Param(
            _init(("embed", "heads", "head_dim"))(rngs.params(), (EMBED, HEADS, HEAD_DIM))
        )
        self.value = nnx.Param(
            _init(("embed", "heads", "head_dim"))(rngs.params(), (EMBED, HEADS, HEAD_DIM))
        )
        self.out = nnx.Param(
            _init(("heads", "head_dim", "embed"))(rngs.params(), (HEADS, HEAD_DIM, EMBED))
        )
        self.up = nnx.Param(_init(("embed", "mlp"))(rngs.params(), (EMBED, MLP)))
        self.up_bias = nnx.Param(_init(("mlp",), nnx.initializers.zeros)(rngs.params(), (MLP,)))
        self.down = nnx.Param(_init(("mlp", "embed"))(rngs.params(), (MLP, EMBED)))
        self.unembed = nnx.Param(_init(("embed", "vocab"))(rngs.params(), (EMBED, VOCAB)))

    def __call__(self, tokens):
        x = self.embed[...][tokens]
        q = jnp.einsum("bte,ehd->bthd", x, self.query[...])
        k = jnp.einsum("bte,ehd->bthd", x, self.key[...])
        v = jnp.einsum("bte,ehd->bthd", x, self.value[...])
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HEAD_DIM)
        causal = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + jnp.einsum("bhts,bshd,hde->bte", weights, v, self.out[...])
        x = x + jax.nn.gelu(x @ self.up[...] + self.up_bias[...]) @ self.down[...]
        return x @ self.unembed[...]


def make_model(seed=0):
    """The model, created without eager sharding (params live on the default device)."""
    with nnx.use_eager_sharding(False):
        return TinyLM(rngs=nnx.Rngs(seed))


def make_tx():
    return optax.adamw(1e-2, weight_decay=0.1)


def make_tokens(num_batches, seed=0):
    """Deterministic token batches, [num_batches, BATCH, SEQ] int32."""
    return np.random.default_rng(seed).integers(0, VOCAB, (num_batches, BATCH, SEQ), np.int32)


def next_token_loss(graphdef, params, tokens):
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(graphdef, tx):
    """step((params, opt_state), tokens) -> ((params, opt_state), loss)."""

    def step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(graphdef, p, tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step
