"""Attention behind one function: the model calls `attention(...)`, the impl is a setting.

impl:
  "xla"      grouped einsum over the full [T, S] scores (reference speed, O(T^2) memory)
  "cudnn"    jax.nn.dot_product_attention(implementation="cudnn"); GPU only
  "pallas"   flash attention kernel for the backend: TPU -> Mosaic kernel, GPU -> Triton
             kernel, CPU -> the GPU kernel in interpret mode (slow; for tests)
  "chunked"  blockwise pure-JAX flash attention (the CPU training path, O(T) memory)
  "auto"     the best available for the backend; the only mode that falls back when an
             impl does not support the inputs (e.g. a head_dim), ending at "xla"

Masking (same for every impl): causal keeps key s <= query t; segment ids [B, T] keep keys of
the same segment (0 = padding; see cmat_jax_kernels.common).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cmat_jax_kernels.chunked import chunked_attention
from cmat_jax_kernels.common import MASK_VALUE, check_attention_inputs, default_scale
from cmat_jax_kernels.decode import decode_attention_pallas, decode_attention_xla
from cmat_jax_kernels.errors import AttentionInputError, UnsupportedAttentionError
from cmat_jax_kernels.flash_gpu import flash_attention_gpu
from cmat_jax_kernels.flash_tpu import flash_attention_tpu

IMPLS = ("xla", "cudnn", "pallas", "chunked", "auto")
DECODE_IMPLS = ("xla", "pallas", "auto")

__all__ = [
    "DECODE_IMPLS",
    "IMPLS",
    "AttentionInputError",
    "UnsupportedAttentionError",
    "attention",
    "decode_attention",
]


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
    backend = jax.default_backend()
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
    mask_BTS = jnp.ones((B, T, S), dtype=bool)
    if causal:
        mask_BTS &= jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)[None]
    if segment_ids_BT is not None:
        mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
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
    if jax.default_backend() != "gpu":
        raise UnsupportedAttentionError(
            f"attention impl 'cudnn' needs a GPU backend, running on {jax.default_backend()!r}"
        )
    _needs_self_attention("cudnn", q_BTHD, k_BSKD)
    mask = None
    if segment_ids_BT is not None:
        mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
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
    kw = dict(segment_ids_BT=segment_ids_BT, causal=causal, scale=scale)
    if jax.default_backend() == "tpu":
        return flash_attention_tpu(q_BTHD, k_BSKD, v_BSKD, **kw)
    return flash_attention_gpu(q_BTHD, k_BSKD, v_BSKD, **kw)  # interpret=True on CPU


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
    k_cache_BSKD: jax.Array,
    v_cache_BSKD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    impl: str = "xla",
    scale: float | None = None,
) -> jax.Array:
    """One new query token per row over cache slots kv_start <= s < kv_end. -> [B, H, D]."""
    if impl not in DECODE_IMPLS:
        raise AttentionInputError(
            f"decode_attention impl must be one of {DECODE_IMPLS}, got {impl!r}"
        )
    kw = dict(kv_start_B=kv_start_B, kv_end_B=kv_end_B, scale=scale)
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "pallas":
        if jax.default_backend() == "tpu":
            raise UnsupportedAttentionError(
                "decode_attention impl 'pallas' has a GPU (Triton) kernel only; on TPU use "
                "impl='xla' or 'auto'"
            )
        return decode_attention_pallas(q_BHD, k_cache_BSKD, v_cache_BSKD, **kw)
    return decode_attention_xla(q_BHD, k_cache_BSKD, v_cache_BSKD, **kw)
