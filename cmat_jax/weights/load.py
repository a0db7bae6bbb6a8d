"""HF-named tensors -> model params, and `load_model(source)` for HF dirs, GGUF files, presets."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from cmat_jax import sharding as shd
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


class TensorSource(Protocol):
    """HF-named tensors with random access by slice (safetensors, GGUF, or in-memory arrays)."""

    shapes: Mapping[str, tuple[int, ...]]  # HF name -> HF shape

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The slice ``index`` of tensor ``name`` in HF layout (``()`` = the whole tensor)."""
        ...


@dataclass(frozen=True)
class ArraySource:
    """In-memory HF-named arrays as a `TensorSource` (e.g. a torch state dict as numpy)."""

    arrays: Mapping[str, np.ndarray]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(a.shape) for n, a in self.arrays.items()}

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return self.arrays[name][index]


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@dataclass(frozen=True)
class _ParamPlan:
    """Where one of our params comes from: one HF tensor per layer (or one for a top param)."""

    shape: tuple[int, ...]  # ours: [in, out] Linear weights, stacked on a leading layer axis
    hf_names: tuple[str, ...]
    transpose: bool
    stacked: bool


def _plan(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> dict:
    """Our param path -> `_ParamPlan`, checked against the source's names and shapes before any
    tensor data is read."""
    layer_specs = layer_param_specs(cfg)
    top_shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_embeddings:
        top_shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    layer_names: dict[str, list[str | None]] = {n: [None] * cfg.num_layers for n in layer_specs}
    top_names: dict[str, str] = {}
    transposed: dict[str, bool] = {}

    for hf, hf_shape in shapes.items():
        if _SKIP_RE.match(hf):
            continue
        m = _LAYER_RE.match(hf)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix not in HF_LAYER_NAMES or layer >= cfg.num_layers:
                raise LoadError(f"{where}: unexpected tensor {hf!r} for this config")
            name, transpose = HF_LAYER_NAMES[suffix]
            if name not in layer_specs:
                raise LoadError(
                    f"{where}: tensor {hf!r} is not used by this config "
                    f"(qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias})"
                )
            expected = layer_specs[name][0][1:]
            layer_names[name][layer] = hf
        elif hf in HF_TOP_NAMES:
            name, transpose = HF_TOP_NAMES[hf]
            if name == "lm_head" and cfg.tie_embeddings:
                continue  # some tied checkpoints still store a copy
            expected = top_shapes[name]
            top_names[name] = hf
        else:
            raise LoadError(f"{where}: unexpected tensor {hf!r}")
        ours = tuple(hf_shape[::-1]) if transpose else tuple(hf_shape)
        if ours != tuple(expected):
            raise LoadError(
                f"{where}: tensor {hf!r} has shape {tuple(hf_shape)}, "
                f"expected {tuple(expected[::-1]) if transpose else tuple(expected)}"
            )
        transposed[name] = transpose

    missing = [n for n in top_shapes if n not in top_names]
    missing += [
        f"{n} (layers {[i for i, h in enumerate(hs) if h is None]})"
        for n, hs in layer_names.items()
        if None in hs
    ]
    if missing:
        raise LoadError(f"{where}: missing tensors: {', '.join(missing)}")
    plans = {
        (name,): _ParamPlan(top_shapes[name], (hf,), transposed[name], False)
        for name, hf in top_names.items()
    }
    for name, hfs in layer_names.items():
        plans[("layers", name)] = _ParamPlan(
            layer_specs[name][0], tuple(hfs), transposed[name], True
        )
    return plans


def _read_shard(
    source: TensorSource, plan: _ParamPlan, index: tuple[slice, ...], dtype: np.dtype
) -> np.ndarray:
    """Our param's slice ``index`` as a host array of ``dtype``, read slice by slice from the
    HF tensors (one layer's slice at a time for stacked params)."""
    index = tuple(index) + (slice(None),) * (len(plan.shape) - len(index))

    def hf_slice(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        if plan.transpose:
            return source.read(name, idx[::-1]).T
        return source.read(name, idx)

    if not plan.stacked:
        return np.asarray(hf_slice(plan.hf_names[0], index), dtype)
    layers = range(*index[0].indices(plan.shape[0]))
    inner_shape = tuple(
        len(range(*s.indices(d))) for s, d in zip(index[1:], plan.shape[1:], strict=True)
    )
    out = np.empty((len(layers), *inner_shape), dtype)
    for i, layer in enumerate(layers):
        out[i] = hf_slice(plan.hf_names[layer], index[1:])
    return out


def _place(
    shape: tuple[int, ...],
    sharding: NamedSharding | None,
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> jax.Array:
    """One param on device(s). With a sharding, each distinct shard is read on the host once and
    copied to the devices that hold it before the next is read, so the host never holds more
    than one shard; without, the whole param goes to the default device (uncommitted)."""
    if sharding is None:
        return jnp.asarray(read(()))
    by_index: dict[tuple, list[Any]] = {}
    indices = sharding.addressable_devices_indices_map(shape)
    for device, index in indices.items():
        key = tuple((s.start, s.stop, s.step) for s in index)
        by_index.setdefault(key, []).append(device)
    placed: dict[Any, jax.Array] = {}
    for key, devices in by_index.items():
        host = read(tuple(slice(*k) for k in key))
        for device in devices:
            placed[device] = jax.device_put(host, device)
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, [placed[d] for d in indices])


def build_model(
    cfg: ModelConfig,
    source: TensorSource | Mapping[str, np.ndarray],
    *,
    where: str = "checkpoint",
    mesh: Mesh | None = None,
) -> Llama:
    """A model filled from HF-named tensors, each param read straight into its place.

    With ``mesh``, every param is laid out by its logical axes (`cmat_jax.sharding` rules) and
    each device's shard is read on its own: no device and no host buffer ever holds a whole
    model. All names and shapes are checked before any tensor data is read.
    """
    if not hasattr(source, "read"):
        source = ArraySource(source)
    plans = _plan(cfg, source.shapes, where)
    dtype = _np_dtype(cfg.param_dtype)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    specs = shd.state_specs(nnx.state(model))
    for path, plan in plans.items():
        spec = functools.reduce(lambda tree, key: tree[key], path, specs)
        sharding = None if mesh is None else NamedSharding(mesh, spec)
        value = _place(
            plan.shape, sharding, lambda idx, plan=plan: _read_shard(source, plan, idx, dtype)
        )
        functools.reduce(getattr, path, model).value = value
    return model


def load_model(
    source: str | Path,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    cache_dir: str | Path | None = None,
    mesh: Mesh | None = None,
    **config_overrides: Any,
):
    """`(model, tokenizer)` from an HF directory, a `.gguf` file, or a preset name.

    `dtype` is the parameter dtype; `compute_dtype` (matmul inputs) defaults to it. With `mesh`,
    the params are loaded sharded by the logical-axis rules (see `build_model`).
    """
    from cmat_jax.tokenizer import load_tokenizer
    from cmat_jax.weights.registry import resolve_source

    resolved = resolve_source(source, cache=cache_dir)
    where = str(resolved.path)
    overrides = {"param_dtype": dtype, "compute_dtype": compute_dtype or dtype, **config_overrides}
    with contextlib.ExitStack() as stack:
        if resolved.kind == "gguf":
            from cmat_jax.weights.gguf_io import read_gguf

            tensors = read_gguf(resolved.path)
            cfg = ModelConfig.from_hf(tensors.hf_config, where=where, **overrides)
        else:
            from cmat_jax.weights.safetensors_io import SafetensorsCheckpoint

            config_file = resolved.path / "config.json"
            config_where = str(config_file if config_file.exists() else resolved.path)
            cfg = ModelConfig.from_hf(resolved.hf_config(), where=config_where, **overrides)
            tensors = stack.enter_context(SafetensorsCheckpoint(resolved.path))
        tokenizer = load_tokenizer(resolved.path)
        check_vocab(cfg, tokenizer, where=where)
        if mesh is not None:
            shd.validate(cfg, mesh)
        model = build_model(cfg, tensors, where=where, mesh=mesh)
    return model, tokenizer


def check_vocab(cfg: ModelConfig, tokenizer: Any, *, where: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LoadError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the embedding table has "
            f"only {cfg.vocab_size} rows (tokenizer and model do not match)"
        )
