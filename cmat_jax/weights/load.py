"""HF-named tensors -> model params, and `load_model(source)` for HF dirs, GGUF files, presets."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama, layer_param_specs

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF per-layer suffix -> (our stacked param, transpose the [out, in] Linear weight).
HF_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.o_proj.bias": ("bo", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
HF_TOP_NAMES = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}
# Tensors HF checkpoints may carry that hold no weights of ours.
_SKIP_RE = re.compile(r".*rotary_emb\.inv_freq$")


class LoadError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and tensor."""


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def build_model(
    cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, where: str = "checkpoint"
) -> Llama:
    """Fill a model from streamed HF-named tensors (each copied once into its stacked slot)."""
    dt = _np_dtype(cfg.param_dtype)
    layer_specs = layer_param_specs(cfg)
    buffers: dict[str, np.ndarray] = {n: np.empty(s, dt) for n, (s, _) in layer_specs.items()}
    filled: dict[str, np.ndarray] = {n: np.zeros(cfg.num_layers, bool) for n in layer_specs}
    top_shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_embeddings:
        top_shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    top: dict[str, np.ndarray] = {}

    for hf_name, array in tensors:
        if _SKIP_RE.match(hf_name):
            continue
        m = _LAYER_RE.match(hf_name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix not in HF_LAYER_NAMES or layer >= cfg.num_layers:
                raise LoadError(f"{where}: unexpected tensor {hf_name!r} for this config")
            name, transpose = HF_LAYER_NAMES[suffix]
            if name not in buffers:
                raise LoadError(
                    f"{where}: tensor {hf_name!r} is not used by this config "
                    f"(qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias})"
                )
            value = array.T if transpose else array
            expected = buffers[name].shape[1:]
            if value.shape != expected:
                raise LoadError(
                    f"{where}: tensor {hf_name!r} has shape {array.shape}, "
                    f"expected {expected[::-1] if transpose else expected}"
                )
            buffers[name][layer] = value
            filled[name][layer] = True
        elif hf_name in HF_TOP_NAMES:
            name, transpose = HF_TOP_NAMES[hf_name]
            if name == "lm_head" and cfg.tie_embeddings:
                continue  # some tied checkpoints still store a copy
            value = array.T if transpose else array
            if value.shape != top_shapes[name]:
                raise LoadError(
                    f"{where}: tensor {hf_name!r} has shape {array.shape}, "
                    f"expected {top_shapes[name][::-1] if transpose else top_shapes[name]}"
                )
            top[name] = np.asarray(value, dt)
        else:
            raise LoadError(f"{where}: unexpected tensor {hf_name!r}")

    missing = [n for n in top_shapes if n not in top]
    missing += [
        f"{n} (layers {np.flatnonzero(~f).tolist()})" for n, f in filled.items() if not f.all()
    ]
    if missing:
        raise LoadError(f"{where}: missing tensors: {', '.join(missing)}")

    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    model.embed.value = jnp.asarray(top["embed"])
    model.final_norm.value = jnp.asarray(top["final_norm"])
    if not cfg.tie_embeddings:
        model.lm_head.value = jnp.asarray(top["lm_head"])
    for name, buf in buffers.items():
        getattr(model.layers, name).value = jnp.asarray(buf)
        buffers[name] = None  # free the host copy as soon as the device has it
    return model


def load_model(
    source: str | Path,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    cache_dir: str | Path | None = None,
    **config_overrides: Any,
):
    """`(model, tokenizer)` from an HF directory, a `.gguf` file, or a preset name.

    `dtype` is the parameter dtype; `compute_dtype` (matmul inputs) defaults to it.
    """
    from cmat_jax.tokenizer import load_tokenizer
    from cmat_jax.weights.registry import resolve_source

    resolved = resolve_source(source, cache=cache_dir)
    overrides = {"param_dtype": dtype, "compute_dtype": compute_dtype or dtype, **config_overrides}
    if resolved.kind == "gguf":
        from cmat_jax.weights.gguf_io import read_gguf

        gguf = read_gguf(resolved.path)
        cfg = ModelConfig.from_hf(gguf.hf_config, where=str(resolved.path), **overrides)
        model = build_model(cfg, gguf.iter_tensors(), where=str(resolved.path))
        tokenizer = load_tokenizer(resolved.path)
    else:
        from cmat_jax.weights.safetensors_io import iter_safetensors

        config_file = resolved.path / "config.json"
        where = str(config_file if config_file.exists() else resolved.path)
        cfg = ModelConfig.from_hf(resolved.hf_config(), where=where, **overrides)
        model = build_model(cfg, iter_safetensors(resolved.path), where=str(resolved.path))
        tokenizer = load_tokenizer(resolved.path)
    check_vocab(cfg, tokenizer, where=str(resolved.path))
    return model, tokenizer


def check_vocab(cfg: ModelConfig, tokenizer: Any, *, where: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LoadError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the embedding table has "
            f"only {cfg.vocab_size} rows (tokenizer and model do not match)"
        )
