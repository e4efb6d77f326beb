"""Configuration of the decoder-only language model shared by the Llama, Qwen2 and GPT-2 families.

One frozen dataclass, :class:`ModelConfig`, describes every model this package builds. The
three families differ only in a handful of switches:

==============  =========  ========  ==========  ===================  ========
family          norm       position  MLP         biases               tied
==============  =========  ========  ==========  ===================  ========
Llama           RMSNorm    RoPE      SwiGLU      optional (q,k,v,o)   optional
Qwen2           RMSNorm    RoPE      SwiGLU      q, k, v only         optional
GPT-2           LayerNorm  learned   GELU(tanh)  everywhere           yes
==============  =========  ========  ==========  ===================  ========

References: Touvron et al. 2023 (Llama), Qwen Team 2024 (Qwen2), Radford et al. 2019
(GPT-2), Su et al. 2021 (RoPE), Shazeer 2020 (SwiGLU), Ainslie et al. 2023 (grouped-query
attention), Zhang & Sennrich 2019 (RMSNorm).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = ("llama", "qwen2", "gpt2")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("swiglu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")


def _require_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive integer.")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name}={value!r}: expected one of {choices}.")


def _dtype_name(name: str, value: Any) -> str:
    try:
        dtype_name = jnp.dtype(value).name
    except TypeError as error:
        raise ValueError(f"ModelConfig.{name}={value!r}: expected one of {DTYPES}.") from error
    _require_choice(name, dtype_name, DTYPES)
    return dtype_name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a pre-norm decoder-only transformer.

    Attributes:
      architecture: the Hugging Face family the weights follow on export,
        ``"llama"``, ``"qwen2"`` or ``"gpt2"``.
      vocab_size: number of token ids V.
      hidden_size: residual width E.
      num_layers: number of transformer blocks.
      num_heads: query heads H.
      num_kv_heads: key/value heads K (grouped-query attention; ``H % K == 0``).
        ``None`` means ``num_heads`` (multi-head attention).
      head_dim: per-head width D; ``None`` means ``hidden_size // num_heads``.
      mlp_hidden_size: inner width M of the feed-forward block.
      max_position_embeddings: longest sequence (size of the learned position table).
      norm: ``"rmsnorm"`` or ``"layernorm"``.
      norm_eps: ε added to the variance inside the norm.
      position: ``"rope"`` (rotary, on q and k) or ``"learned"`` (added to the embedding).
      rope_theta: RoPE base θ; frequencies are θ^(-2i/D).
      activation: ``"swiglu"`` (``down(silu(gate x) * up x)``) or ``"gelu_tanh"``
        (``proj(gelu_tanh(fc x))``, the GPT-2 approximation).
      qkv_bias: bias on the query, key and value projections.
      attn_out_bias: bias on the attention output projection.
      mlp_bias: biases in the feed-forward block.
      tie_embeddings: the output projection is the transposed token embedding.
      dtype: compute dtype of activations (``"float32"`` or ``"bfloat16"``); softmax and
        logits are always float32.
      param_dtype: storage dtype of the parameters.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_hidden_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    position: str = "rope"
    rope_theta: float = 10000.0
    activation: str = "swiglu"
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self) -> None:
        _require_choice("architecture", self.architecture, ARCHITECTURES)
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "mlp_hidden_size",
            "max_position_embeddings",
        ):
            _require_positive(name, getattr(self, name))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _require_positive("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads!r}: expected a divisor of "
                f"num_heads={self.num_heads}."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.num_heads={self.num_heads!r}: expected a divisor of "
                    f"hidden_size={self.hidden_size} (or give head_dim explicitly)."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require_positive("head_dim", self.head_dim)
        _require_choice("norm", self.norm, NORMS)
        _require_choice("position", self.position, POSITIONS)
        _require_choice("activation", self.activation, ACTIVATIONS)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim!r}: expected an even width for RoPE."
            )
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps={self.norm_eps!r}: expected a positive float.")
        if not self.rope_theta > 0:
            raise ValueError(
                f"ModelConfig.rope_theta={self.rope_theta!r}: expected a positive float."
            )
        object.__setattr__(self, "dtype", _dtype_name("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name("param_dtype", self.param_dtype))

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head, ``H // K``."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def llama(
        cls,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_hidden_size: int,
        **overrides: Any,
    ) -> ModelConfig:
        """A Llama-family config: RMSNorm, RoPE, SwiGLU, no biases, untied by default."""
        return cls(
            architecture="llama",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_hidden_size=mlp_hidden_size,
            **{"norm_eps": 1e-6, **overrides},
        )

    @classmethod
    def qwen2(
        cls,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_hidden_size: int,
        **overrides: Any,
    ) -> ModelConfig:
        """A Qwen2-family config: as Llama, with biases on q, k and v only."""
        defaults = {"norm_eps": 1e-6, "qkv_bias": True, "rope_theta": 1e6}
        return cls(
            architecture="qwen2",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_hidden_size=mlp_hidden_size,
            **{**defaults, **overrides},
        )

    @classmethod
    def gpt2(
        cls,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_hidden_size: int | None = None,
        **overrides: Any,
    ) -> ModelConfig:
        """A GPT-2 config: LayerNorm, learned positions, GELU(tanh), biases, tied embeddings.

        ``mlp_hidden_size`` defaults to ``4 * hidden_size`` as in Radford et al. 2019.
        """
        defaults = {
            "norm": "layernorm",
            "norm_eps": 1e-5,
            "position": "learned",
            "activation": "gelu_tanh",
            "qkv_bias": True,
            "attn_out_bias": True,
            "mlp_bias": True,
            "tie_embeddings": True,
            "max_position_embeddings": 1024,
        }
        return cls(
            architecture="gpt2",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_hidden_size=mlp_hidden_size or 4 * hidden_size,
            **{**defaults, **overrides},
        )


_PRESETS = {
    "gpt2-124m": lambda: ModelConfig.gpt2(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12
    ),
    "qwen2-0.5b": lambda: ModelConfig.qwen2(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        mlp_hidden_size=4864,
        max_position_embeddings=32768,
        tie_embeddings=True,
    ),
    "tinyllama-1.1b": lambda: ModelConfig.llama(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        mlp_hidden_size=5632,
        norm_eps=1e-5,
    ),
    "llama-tiny": lambda: ModelConfig.llama(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden_size=128,
        max_position_embeddings=256,
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration (see ``PRESET_NAMES``) with optional field overrides.

    The published sizes are those of GPT-2 small (Radford et al. 2019), Qwen2-0.5B
    (Qwen Team 2024) and TinyLlama-1.1B (Zhang et al. 2024); ``"llama-tiny"`` is a
    test-sized Llama.
    """
    if name not in _PRESETS:
        raise ValueError(f"preset name={name!r}: expected one of {PRESET_NAMES}.")
    config = _PRESETS[name]()
    return config.replace(**overrides) if overrides else config
