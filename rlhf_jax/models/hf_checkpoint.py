"""Import and export of Hugging Face checkpoints (safetensors only, never pickle).

Supported layouts: ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``GPT2LMHeadModel``
directories holding ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Import gives a :class:`ModelConfig` and the
``nnx.State`` of :class:`Decoder` parameters; export writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Weight layouts. A PyTorch ``nn.Linear`` stores ``W [out, in]`` and computes ``x Wᵀ``; our
kernels are ``[in..., out...]``, so ``q_proj.weight [H·D, E]`` becomes the query kernel
``Wᵀ.reshape(E, H, D)`` and ``o_proj.weight [E, H·D]`` becomes ``Wᵀ.reshape(H, D, E)``.
GPT-2's ``Conv1D`` already stores ``[in, out]``; its fused ``c_attn`` ``[E, 3E]`` is split
along the output axis into q, k and v (in that order).

Typical use::

    config, params = load_hf_checkpoint("path/to/dir")
    model = build_decoder(config, params)
    save_hf_checkpoint("out/dir", config, nnx.state(model, nnx.Param))
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Decoder

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
_EXPORT_NAMES = {family: name for name, family in _HF_ARCHITECTURES.items()}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
PathLike = str | pathlib.Path


@dataclasses.dataclass(frozen=True)
class _TensorRule:
    """How one Hugging Face tensor maps onto one of our parameters.

    ``layout`` is ``"linear"`` (torch ``[out, in]``, transposed), ``"conv1d"``
    (``[in, out]``), ``"flat"`` (same elements on one axis) or ``"same"`` (unchanged);
    ``num_in_axes`` is the number of leading input axes of our kernel.
    """

    hf_name: str
    path: tuple[Any, ...]
    layout: str
    num_in_axes: int = 1

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of a parameter whose shape (ours) is ``shape``."""
        if self.layout == "same":
            return shape
        if self.layout == "flat":
            return (math.prod(shape),)
        n_in = math.prod(shape[: self.num_in_axes])
        n_out = math.prod(shape[self.num_in_axes :])
        return (n_out, n_in) if self.layout == "linear" else (n_in, n_out)

    def to_ours(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Convert a Hugging Face tensor to our layout."""
        if self.layout == "linear":
            tensor = tensor.T
        return tensor.reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """Convert one of our parameters to the Hugging Face layout."""
        if self.layout == "linear":
            return np.ascontiguousarray(value.reshape(self.hf_shape(value.shape)[::-1]).T)
        return value.reshape(self.hf_shape(value.shape))


def _llama_rules(config: ModelConfig) -> list[_TensorRule]:
    rules = [_TensorRule("model.embed_tokens.weight", ("token_embedding",), "same")]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        rules.append(
            _TensorRule(f"{hf}.input_layernorm.weight", (*ours, "attn_norm", "scale"), "flat")
        )
        rules.append(
            _TensorRule(
                f"{hf}.post_attention_layernorm.weight", (*ours, "mlp_norm", "scale"), "flat"
            )
        )
        for hf_proj, our_proj in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            path = (*ours, "attn", our_proj)
            rules.append(
                _TensorRule(f"{hf}.self_attn.{hf_proj}.weight", (*path, "kernel"), "linear")
            )
            if config.qkv_bias:
                rules.append(_TensorRule(f"{hf}.self_attn.{hf_proj}.bias", (*path, "bias"), "flat"))
        out = (*ours, "attn", "out")
        rules.append(_TensorRule(f"{hf}.self_attn.o_proj.weight", (*out, "kernel"), "linear", 2))
        if config.attn_out_bias:
            rules.append(_TensorRule(f"{hf}.self_attn.o_proj.bias", (*out, "bias"), "flat"))
        for hf_proj, our_proj in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            path = (*ours, "mlp", our_proj)
            rules.append(_TensorRule(f"{hf}.mlp.{hf_proj}.weight", (*path, "kernel"), "linear"))
            if config.mlp_bias:
                rules.append(_TensorRule(f"{hf}.mlp.{hf_proj}.bias", (*path, "bias"), "flat"))
    rules.append(_TensorRule("model.norm.weight", ("final_norm", "scale"), "flat"))
    if not config.tie_embeddings:
        rules.append(_TensorRule("lm_head.weight", ("lm_head",), "linear"))
    return rules


def _gpt2_rules(config: ModelConfig, prefix: str) -> list[_TensorRule]:
    """GPT-2 rules; the fused ``c_attn`` appears as virtual ``c_attn.{q,k,v}`` names."""
    rules = [
        _TensorRule(f"{prefix}wte.weight", ("token_embedding",), "same"),
        _TensorRule(f"{prefix}wpe.weight", ("position_embedding",), "same"),
    ]
    for i in range(config.num_layers):
        hf, ours = f"{prefix}h.{i}", ("layers", i)
        for norm_hf, norm_ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            rules.append(_TensorRule(f"{hf}.{norm_hf}.weight", (*ours, norm_ours, "scale"), "flat"))
            rules.append(_TensorRule(f"{hf}.{norm_hf}.bias", (*ours, norm_ours, "bias"), "flat"))
        for part, our_proj in (("q", "query"), ("k", "key"), ("v", "value")):
            path = (*ours, "attn", our_proj)
            rules.append(
                _TensorRule(f"{hf}.attn.c_attn.{part}.weight", (*path, "kernel"), "conv1d")
            )
            rules.append(_TensorRule(f"{hf}.attn.c_attn.{part}.bias", (*path, "bias"), "flat"))
        out = (*ours, "attn", "out")
        rules.append(_TensorRule(f"{hf}.attn.c_proj.weight", (*out, "kernel"), "conv1d", 2))
        rules.append(_TensorRule(f"{hf}.attn.c_proj.bias", (*out, "bias"), "flat"))
        for hf_proj, our_proj in (("c_fc", "up"), ("c_proj", "down")):
            path = (*ours, "mlp", our_proj)
            rules.append(_TensorRule(f"{hf}.mlp.{hf_proj}.weight", (*path, "kernel"), "conv1d"))
            rules.append(_TensorRule(f"{hf}.mlp.{hf_proj}.bias", (*path, "bias"), "flat"))
    rules.append(_TensorRule(f"{prefix}ln_f.weight", ("final_norm", "scale"), "flat"))
    rules.append(_TensorRule(f"{prefix}ln_f.bias", ("final_norm", "bias"), "flat"))
    return rules


def _rope_theta(hf_config: dict[str, Any]) -> float:
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json rope type {rope_type!r}: only 'default' RoPE is supported.")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def _require_value(hf_config: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    value = hf_config.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(f"config.json {key}={value!r}: expected one of {allowed}.")


def config_from_hf(
    hf_config: dict[str, Any], *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dictionary into a :class:`ModelConfig`.

    Args:
      hf_config: the parsed ``config.json``.
      dtype: compute dtype of the resulting model.
      param_dtype: parameter dtype of the resulting model.

    Returns:
      The equivalent configuration.

    Raises:
      ValueError: unknown architecture, or a feature this model does not implement
        (RoPE scaling, sliding-window attention, another activation), naming the key.
    """
    architectures = hf_config.get("architectures") or []
    known = [name for name in architectures if name in _HF_ARCHITECTURES]
    if not known:
        raise ValueError(
            f"config.json architectures={architectures!r}: expected one of "
            f"{tuple(_HF_ARCHITECTURES)}."
        )
    family = _HF_ARCHITECTURES[known[0]]
    dtypes = {"dtype": dtype, "param_dtype": param_dtype}
    if family == "gpt2":
        _require_value(hf_config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"))
        _require_value(hf_config, "scale_attn_by_inverse_layer_idx", (False,))
        _require_value(hf_config, "scale_attn_weights", (True,))
        return ModelConfig.gpt2(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["n_embd"],
            num_layers=hf_config["n_layer"],
            num_heads=hf_config["n_head"],
            mlp_hidden_size=hf_config.get("n_inner") or 4 * hf_config["n_embd"],
            max_position_embeddings=hf_config["n_positions"],
            norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf_config.get("tie_word_embeddings", True),
            **dtypes,
        )
    _require_value(hf_config, "hidden_act", ("silu",))
    _require_value(hf_config, "use_sliding_window", (False,))
    common = {
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hf_config["hidden_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_heads": hf_config["num_attention_heads"],
        "num_kv_heads": hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        "head_dim": hf_config.get("head_dim"),
        "mlp_hidden_size": hf_config["intermediate_size"],
        "max_position_embeddings": hf_config.get("max_position_embeddings", 2048),
        "norm_eps": hf_config.get("rms_norm_eps", 1e-6),
        "rope_theta": _rope_theta(hf_config),
        "tie_embeddings": hf_config.get("tie_word_embeddings", False),
        **dtypes,
    }
    if family == "qwen2":
        return ModelConfig.qwen2(**common)
    attention_bias = bool(hf_config.get("attention_bias", False))
    return ModelConfig.llama(
        qkv_bias=attention_bias,
        attn_out_bias=attention_bias,
        mlp_bias=bool(hf_config.get("mlp_bias", False)),
        **common,
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dictionary of ``config``.

    Raises:
      ValueError: when ``config`` cannot be expressed in its family's Hugging Face
        layout (for example a Llama with q/k/v bias but no output bias), naming the field.
    """
    _check_exportable(config)
    common = {
        "architectures": [_EXPORT_NAMES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
    }
    if config.architecture == "gpt2":
        return {
            **common,
            "n_embd": config.hidden_size,
            "n_layer": config.num_layers,
            "n_head": config.num_heads,
            "n_inner": config.mlp_hidden_size,
            "n_positions": config.max_position_embeddings,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": "gelu_new",
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        }
    hf_config = {
        **common,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_hidden_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    if config.architecture == "llama":
        hf_config["attention_bias"] = config.qkv_bias
        hf_config["mlp_bias"] = config.mlp_bias
    return hf_config


def _check_exportable(config: ModelConfig) -> None:
    expected: dict[str, Any] = {"norm": "rmsnorm", "position": "rope", "activation": "swiglu"}
    if config.architecture == "qwen2":
        expected.update(qkv_bias=True, attn_out_bias=False, mlp_bias=False)
    elif config.architecture == "llama":
        expected.update(attn_out_bias=config.qkv_bias)
    else:
        expected = {
            "norm": "layernorm",
            "position": "learned",
            "activation": "gelu_tanh",
            "qkv_bias": True,
            "attn_out_bias": True,
            "mlp_bias": True,
            "tie_embeddings": True,
            "num_kv_heads": config.num_heads,
            "head_dim": config.hidden_size // config.num_heads,
        }
    for field, value in expected.items():
        if getattr(config, field) != value:
            raise ValueError(
                f"ModelConfig.{field}={getattr(config, field)!r}: the Hugging Face "
                f"{_EXPORT_NAMES[config.architecture]} layout needs {value!r}."
            )


def _rules(config: ModelConfig, prefix: str = "transformer.") -> list[_TensorRule]:
    return _gpt2_rules(config, prefix) if config.architecture == "gpt2" else _llama_rules(config)


class _TensorReader:
    """Lazy reader of the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: pathlib.Path):
        if (directory / _INDEX_FILE).exists():
            weight_map = json.loads((directory / _INDEX_FILE).read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / _SINGLE_FILE).exists():
            with safe_open(directory / _SINGLE_FILE, framework="numpy") as handle:
                self.files = {name: directory / _SINGLE_FILE for name in handle.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"{directory}: expected {_SINGLE_FILE} or {_INDEX_FILE}.")
        self.directory = directory

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ValueError(f"{self.directory}: missing tensor {name!r}.")
        with safe_open(self.files[name], framework="numpy") as handle:
            return handle.get_tensor(name)


class _Gpt2Reader:
    """Presents GPT-2's fused ``c_attn`` tensors as separate virtual q/k/v tensors."""

    def __init__(self, reader: _TensorReader):
        self.reader = reader

    def read(self, name: str) -> np.ndarray:
        if ".c_attn." not in name:
            return self.reader.read(name)
        stem, part, kind = name.rsplit(".", 2)
        fused = self.reader.read(f"{stem}.{kind}")
        return np.split(fused, 3, axis=-1)["qkv".index(part)]


def _abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def load_hf_checkpoint(
    directory: PathLike, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> tuple[ModelConfig, nnx.State]:
    """Read a Hugging Face checkpoint directory into a config and ``Decoder`` parameters.

    Args:
      directory: folder with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``).
      dtype: compute dtype of the model.
      param_dtype: dtype the parameters are cast to.

    Returns:
      ``(config, params)`` where ``params`` is the ``nnx.State`` of the ``nnx.Param``
      variables of ``Decoder(config)`` (with their logical-axis metadata).

    Raises:
      ValueError: unknown architecture, missing tensor, or a tensor whose shape differs
        from the one the config implies (naming the tensor and both shapes).
    """
    directory = pathlib.Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    config = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    reader = _TensorReader(directory)
    prefix = "transformer." if "transformer.wte.weight" in reader else ""
    source = _Gpt2Reader(reader) if config.architecture == "gpt2" else reader
    _, abstract = _abstract_params(config)
    rules = {rule.path: rule for rule in _rules(config, prefix)}
    target_dtype = jnp.dtype(config.param_dtype)
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        rule = rules[path]
        shape = tuple(variable.get_value().shape)
        tensor = source.read(rule.hf_name)
        if tuple(tensor.shape) != rule.hf_shape(shape):
            raise ValueError(
                f"{directory}: tensor {rule.hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {rule.hf_shape(shape)} for {config.architecture} config."
            )
        value = jnp.asarray(rule.to_ours(tensor, shape), dtype=target_dtype)
        leaves.append((path, variable.replace(value)))
    return config, nnx.from_flat_state(leaves)


def build_decoder(config: ModelConfig, params: nnx.State) -> Decoder:
    """A :class:`Decoder` for ``config`` holding ``params`` (no random initialisation)."""
    graphdef, _ = _abstract_params(config)
    return nnx.merge(graphdef, params)


def load_hf_model(
    directory: PathLike, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> Decoder:
    """:func:`load_hf_checkpoint` then :func:`build_decoder`."""
    config, params = load_hf_checkpoint(directory, dtype=dtype, param_dtype=param_dtype)
    return build_decoder(config, params)


def _hf_tensors(config: ModelConfig, params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
    values = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}
    fused: dict[str, list[np.ndarray]] = {}
    for rule in _rules(config):
        if rule.path not in values:
            raise ValueError(f"params: missing parameter {'/'.join(map(str, rule.path))!r}.")
        tensor = rule.to_hf(values[rule.path])
        if ".c_attn." in rule.hf_name:
            stem, part, kind = rule.hf_name.rsplit(".", 2)
            fused.setdefault(f"{stem}.{kind}", []).append(tensor)
            if part == "v":
                yield f"{stem}.{kind}", np.concatenate(fused.pop(f"{stem}.{kind}"), axis=-1)
        else:
            yield rule.hf_name, tensor


def save_hf_checkpoint(
    directory: PathLike,
    config: ModelConfig,
    params: nnx.State,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json`` and safetensors weights loadable by ``transformers``.

    Args:
      directory: output folder (created if needed).
      config: the model configuration.
      params: ``nnx.state(model, nnx.Param)`` of a ``Decoder(config)``.
      max_shard_bytes: when given, split the weights into shards of at most this many
        bytes (a single tensor larger than that gets its own shard) and write
        ``model.safetensors.index.json``.
    """
    hf_config = config_to_hf(config)
    tensors = dict(_hf_tensors(config, params))
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    if max_shard_bytes is None:
        save_file(tensors, str(directory / _SINGLE_FILE), metadata={"format": "pt"})
        return
    shards = list(_shard(tensors, max_shard_bytes))
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (directory / _INDEX_FILE).write_text(json.dumps(index, indent=2))


def _shard(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, tensor in tensors.items():
        if shard and size + tensor.nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    if shard:
        yield shard
