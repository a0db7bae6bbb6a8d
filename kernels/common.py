"""Input checks, padding and mask helpers shared by every attention implementation.

Masking semantics (all impls agree, tested against `reference.py`):

* causal: query t attends key s only when s <= t (T == S, self-attention / prefill).
* segment ids (int32 [B, T]): query t attends key s only when seg[t] == seg[s]. Packed
  sequences use ids 1, 2, ...; padding uses 0, so padding is never attended from a real
  (nonzero) segment. Padding rows attend among themselves, which keeps every row non-empty
  (no NaN); their outputs are meaningless and the loss must mask them.
* shared prefix: keys of segment `SHARED_SEGMENT` are seen by every query of the row (still
  causally). A packed row may begin with one prompt prefix that all its segments continue, so
  the prefix is computed once per row instead of once per segment (`cmat_jax.data.rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .errors import AttentionInputError

# A finite "minus infinity": fully masked rows then give exp(MASK - MASK) = 1 (finite garbage,
# sliced or loss-masked away) instead of NaN, and exp(MASK - real_max) underflows to 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The segment id of a row's shared prefix (see the module doc); no packer reaches it otherwise.
SHARED_SEGMENT = 2**31 - 1


def segments_visible(qseg: jax.Array, kseg: jax.Array) -> jax.Array:
    """Bool, broadcast of qseg against kseg: may a query of segment qseg see a key of kseg."""
    return (qseg == kseg) | (kseg == SHARED_SEGMENT)


def attention_mask_BTS(
    B: int, T: int, S: int, segment_ids_BT: jax.Array | None, causal: bool
) -> jax.Array:
    """Boolean [B, T, S]: True where query t may attend key s. The T queries are the last T of
    the S key slots (a chunked prefill's block; T == S for self-attention)."""
    mask_BTS = jnp.ones((B, T, S), dtype=bool)
    if causal:
        mask_BTS &= jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)[None]
    if segment_ids_BT is not None:
        mask_BTS &= segments_visible(segment_ids_BT[:, :, None], segment_ids_BT[:, None, :])
    return mask_BTS


def check_attention_inputs(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    segment_ids_BT: jax.Array | None,
    *,
    self_attention: bool = True,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (B, T, S, H, K, D). One-line messages naming the field."""
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.ndim != 4:
        raise AttentionInputError(
            f"attention: q, k, v must be rank 4 [B, T, H, D]; got q{q_BTHD.shape} "
            f"k{k_BSKD.shape} v{v_BSKD.shape}"
        )
    B, T, H, D = q_BTHD.shape
    Bk, S, K, Dk = k_BSKD.shape
    if k_BSKD.shape != v_BSKD.shape:
        raise AttentionInputError(f"attention: k{k_BSKD.shape} and v{v_BSKD.shape} differ")
    if Bk != B:
        raise AttentionInputError(f"attention: batch of q ({B}) != batch of k/v ({Bk})")
    if Dk != D:
        raise AttentionInputError(f"attention: head_dim of q ({D}) != head_dim of k/v ({Dk})")
    if K == 0 or H % K:
        raise AttentionInputError(
            f"attention: query heads ({H}) must be a multiple of kv heads ({K})"
        )
    if self_attention and S != T:
        raise AttentionInputError(
            f"attention: this impl needs self-attention (T == S); got T={T}, S={S}"
        )
    if segment_ids_BT is not None:
        if tuple(segment_ids_BT.shape) != (B, T):
            raise AttentionInputError(
                f"attention: segment_ids must have shape [B, T] = {(B, T)}, "
                f"got {tuple(segment_ids_BT.shape)}"
            )
        if not jnp.issubdtype(segment_ids_BT.dtype, jnp.integer):
            raise AttentionInputError(
                f"attention: segment_ids must be integers, got {segment_ids_BT.dtype}"
            )
    return B, T, S, H, K, D


def check_decode_inputs(
    q_BHD: jax.Array,
    k_cache_BKSD: jax.Array,
    v_cache_BKSD: jax.Array,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
) -> tuple[int, int, int, int, int]:
    """Validate decode shapes (caches in the KV-cache layout [B, K, S, D]); return (B, S, H, K, D)."""
    if q_BHD.ndim != 3 or k_cache_BKSD.ndim != 4:
        raise AttentionInputError(
            f"decode_attention: q must be [B, H, D] and caches [B, K, S, D]; got "
            f"q{q_BHD.shape} k{k_cache_BKSD.shape}"
        )
    B, H, D = q_BHD.shape
    if k_cache_BKSD.shape != v_cache_BKSD.shape:
        raise AttentionInputError(
            f"decode_attention: k_cache{k_cache_BKSD.shape} != v_cache{v_cache_BKSD.shape}"
        )
    Bk, K, S, Dk = k_cache_BKSD.shape
    if Bk != B or Dk != D:
        raise AttentionInputError(
            f"decode_attention: q{q_BHD.shape} does not match cache{k_cache_BKSD.shape}"
        )
    if K == 0 or H % K:
        raise AttentionInputError(
            f"decode_attention: query heads ({H}) must be a multiple of kv heads ({K})"
        )
    for name, arr in (("kv_start", kv_start_B), ("kv_end", kv_end_B)):
        if tuple(jnp.shape(arr)) != (B,):
            raise AttentionInputError(
                f"decode_attention: {name} must have shape [B] = ({B},), got {jnp.shape(arr)}"
            )
    return B, S, H, K, D


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value: float | int = 0) -> jax.Array:
    """Pad `axis` of x at the end up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def default_scale(D: int, scale: float | None) -> float:
    return float(D) ** -0.5 if scale is None else float(scale)
