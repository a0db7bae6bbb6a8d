"""Attention behind one function: the model calls `attention(...)`, the impl is a setting.

impl:
  "xla"      grouped einsum over the full [T, S] scores (reference speed, O(T^2) memory)
  "cudnn"    jax.nn.dot_product_attention(implementation="cudnn"); GPU only
  "pallas"   flash attention kernel for the platform: TPU -> Mosaic kernel, GPU -> Triton
             kernel, CPU -> the GPU kernel in interpret mode (slow; for tests)
  "chunked"  blockwise pure-JAX flash attention (the CPU training path, O(T) memory)
  "auto"     the best available for the platform; the only mode that falls back when an
             impl does not support the inputs (e.g. a head_dim), ending at "xla"

Platform: the devices of the ambient mesh (`jax.set_mesh`), else JAX's default backend, so a
program lowered for another platform under an `AbstractMesh` of that platform's abstract
devices gets that platform's kernels. Under a mesh the Pallas kernels run inside `shard_map`
over the batch and head axes of `LOGICAL_RULES` (each device attends its own rows and heads;
the sequence is not sharded), so no q/k/v is gathered around the custom call.

Masking (same for every impl): causal keeps key s <= query t; segment ids [B, T] keep keys of
the same segment (0 = padding) and of the row's shared prefix (`SHARED_SEGMENT`); see
cmat_jax_kernels.common.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from cmat_jax_kernels.chunked import chunked_attention
from cmat_jax_kernels.common import (
    MASK_VALUE,
    attention_mask_BTS,
    check_attention_inputs,
    default_scale,
    segments_visible,
)
from cmat_jax_kernels.decode import decode_attention_pallas, decode_attention_xla
from cmat_jax_kernels.errors import AttentionInputError, UnsupportedAttentionError
from cmat_jax_kernels.flash_gpu import flash_attention_gpu
from cmat_jax_kernels.flash_tpu import flash_attention_tpu
from jax.sharding import PartitionSpec

from cmat_jax.sharding import logical_to_spec

IMPLS = ("xla", "cudnn", "pallas", "chunked", "auto")
DECODE_IMPLS = ("xla", "pallas", "auto")

__all__ = [
    "DECODE_IMPLS",
    "IMPLS",
    "AttentionInputError",
    "UnsupportedAttentionError",
    "attention",
    "decode_attention",
    "target_platform",
]


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu': what the program being traced will run on (see the module doc)."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _mesh_axes(mesh, logical: str, *sizes: int) -> tuple[str, ...] | None:
    """Mesh axes the rules give `logical`, if their product divides every size (else None:
    that dim stays whole on each device, which is correct, only redundant)."""
    part = logical_to_spec((logical,))[0]
    names = () if part is None else (part,) if isinstance(part, str) else tuple(part)
    names = tuple(n for n in names if n in mesh.axis_names and mesh.shape[n] > 1)
    n_shards = math.prod(mesh.shape[n] for n in names)
    return names if names and all(s % n_shards == 0 for s in sizes) else None


def _per_shard(fn, args: tuple, dims: tuple, out_dims: tuple, B: int, H: int, K: int):
    """fn(*args) inside `shard_map` over the ambient mesh, split over batch and heads; plain
    fn(*args) off a mesh. `dims[i]` / `out_dims[i]` name each array's dims: "b" batch, "h"
    heads (query or kv: split together, so a shard's query heads map onto its kv heads), ""
    whole. A None arg passes through unsplit."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    axes = {"b": _mesh_axes(mesh, "batch", B), "h": _mesh_axes(mesh, "heads", H, K), "": None}
    spec = lambda d: PartitionSpec(*(axes[c] for c in d.split(",")))
    present = [i for i, x in enumerate(args) if x is not None]

    def body(*shard_args):
        full = list(args)
        for i, x in zip(present, shard_args, strict=True):
            full[i] = x
        return fn(*full)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(spec(dims[i]) for i in present),
        out_specs=tuple(spec(d) for d in out_dims) if len(out_dims) > 1 else spec(out_dims[0]),
        check_vma=False,
    )(*(args[i] for i in present))


def attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    impl: str = "xla",
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention; H query heads share K kv heads (H % K == 0). -> [B, T, H, D]."""
    if impl not in IMPLS:
        raise AttentionInputError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    # Shape errors are the caller's, never a reason to fall back: check them first.
    check_attention_inputs(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, self_attention=False)
    kw = dict(segment_ids_BT=segment_ids_BT, causal=causal, scale=scale)
    if impl != "auto":
        return _IMPL_FNS[impl](q_BTHD, k_BSKD, v_BSKD, **kw)
    last_error: Exception | None = None
    for name in _auto_order():
        try:
            return _IMPL_FNS[name](q_BTHD, k_BSKD, v_BSKD, **kw)
        except UnsupportedAttentionError as e:  # e.g. head_dim, T != S, no cuDNN
            last_error = e
    raise AssertionError(f"attention: 'xla' must accept every valid input ({last_error})")


def _auto_order() -> tuple[str, ...]:
    backend = target_platform()
    if backend == "tpu":
        return ("pallas", "chunked", "xla")
    if backend == "gpu":
        return ("cudnn", "pallas", "chunked", "xla")
    return ("chunked", "xla")  # CPU: interpret-mode Pallas is for tests only


def _needs_self_attention(name: str, q_BTHD: jax.Array, k_BSKD: jax.Array) -> None:
    if q_BTHD.shape[1] != k_BSKD.shape[1]:
        raise UnsupportedAttentionError(
            f"attention impl {name!r} needs T == S; got T={q_BTHD.shape[1]}, "
            f"S={k_BSKD.shape[1]} (use impl='xla')"
        )


def _xla(q_BTHD, k_BSKD, v_BSKD, *, segment_ids_BT, causal, scale):
    """Full-score grouped einsum. With T < S (chunked prefill) queries are the last T slots."""
    B, T, S, H, K, D = check_attention_inputs(
        q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, self_attention=segment_ids_BT is not None
    )
    G = H // K
    q_BKGTD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    s_BKGTS = jnp.einsum(
        "bkgtd,bskd->bkgts",
        q_BKGTD,
        k_BSKD.astype(q_BTHD.dtype),
        preferred_element_type=jnp.float32,
    ) * default_scale(D, scale)
    mask_BTS = attention_mask_BTS(B, T, S, segment_ids_BT, causal)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, MASK_VALUE)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BKGTD = jnp.einsum(
        "bkgts,bskd->bkgtd",
        p_BKGTS.astype(v_BSKD.dtype),
        v_BSKD,
        preferred_element_type=jnp.float32,
    )
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


def _cudnn(q_BTHD, k_BSKD, v_BSKD, *, segment_ids_BT, causal, scale):
    if target_platform() != "gpu":
        raise UnsupportedAttentionError(
            f"attention impl 'cudnn' needs a GPU backend, running on {target_platform()!r}"
        )
    _needs_self_attention("cudnn", q_BTHD, k_BSKD)
    mask = None
    if segment_ids_BT is not None:
        mask = segments_visible(segment_ids_BT[:, :, None], segment_ids_BT[:, None, :])[:, None]
    try:
        return jax.nn.dot_product_attention(
            q_BTHD,
            k_BSKD,
            v_BSKD,
            mask=mask,
            scale=scale,
            is_causal=causal,
            implementation="cudnn",
        )
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise UnsupportedAttentionError(f"attention impl 'cudnn' rejected the inputs: {e}") from e


def _pallas(q_BTHD, k_BSKD, v_BSKD, *, segment_ids_BT, causal, scale):
    _needs_self_attention("pallas", q_BTHD, k_BSKD)
    kernel = flash_attention_tpu if target_platform() == "tpu" else flash_attention_gpu
    # On CPU the GPU kernel runs interpreted (launch.triton_call decides per lowering platform).

    def per_shard(q, k, v, seg):
        return kernel(q, k, v, segment_ids_BT=seg, causal=causal, scale=scale)

    B, _, H, _ = q_BTHD.shape
    return _per_shard(
        per_shard,
        (q_BTHD, k_BSKD, v_BSKD, segment_ids_BT),
        ("b,,h,", "b,,h,", "b,,h,", "b,"),
        ("b,,h,",),
        B,
        H,
        k_BSKD.shape[2],
    )


def _chunked(q_BTHD, k_BSKD, v_BSKD, *, segment_ids_BT, causal, scale):
    _needs_self_attention("chunked", q_BTHD, k_BSKD)
    if q_BTHD.dtype != k_BSKD.dtype or q_BTHD.dtype != v_BSKD.dtype:
        dt = q_BTHD.dtype
        k_BSKD, v_BSKD = k_BSKD.astype(dt), v_BSKD.astype(dt)
    return chunked_attention(
        q_BTHD, k_BSKD, v_BSKD, segment_ids_BT=segment_ids_BT, causal=causal, scale=scale
    )


_IMPL_FNS = {"xla": _xla, "cudnn": _cudnn, "pallas": _pallas, "chunked": _chunked}


def decode_attention(
    q_BHD: jax.Array,
    k_cache_BKSD: jax.Array,
    v_cache_BKSD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    impl: str = "xla",
    scale: float | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One new query token per row over cache slots kv_start <= s < kv_end (caches in the
    KV-cache layout [B, K, S, D]). -> o [B, H, D], with `return_lse` also the f32 logsumexp
    [B, H] of the scores (to merge more keys into the softmax). "auto": the Pallas kernel on
    GPU and TPU, XLA on CPU."""
    if impl not in DECODE_IMPLS:
        raise AttentionInputError(
            f"decode_attention impl must be one of {DECODE_IMPLS}, got {impl!r}"
        )
    if impl == "auto":
        impl = "pallas" if target_platform() in ("gpu", "tpu") else "xla"
    if impl == "xla":
        return decode_attention_xla(
            q_BHD,
            k_cache_BKSD,
            v_cache_BKSD,
            kv_start_B=kv_start_B,
            kv_end_B=kv_end_B,
            scale=scale,
            return_lse=return_lse,
        )
    target = "tpu" if target_platform() == "tpu" else "gpu"  # CPU: the GPU kernel interpreted

    def per_shard(q, k, v, start, end):
        return decode_attention_pallas(
            q,
            k,
            v,
            kv_start_B=start,
            kv_end_B=end,
            scale=scale,
            target=target,
            return_lse=return_lse,
        )

    B, H, _ = q_BHD.shape
    return _per_shard(
        per_shard,
        (q_BHD, k_cache_BKSD, v_cache_BKSD, kv_start_B, kv_end_B),
        ("b,h,", "b,h,,", "b,h,,", "b", "b"),
        ("b,h,", "b,h") if return_lse else ("b,h,",),
        B,
        H,
        k_cache_BKSD.shape[1],
    )
