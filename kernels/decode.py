"""Decode attention: one new query token per row against the KV cache.

Caches are in the KV-cache layout [B, K, S, D] (a kv head's slots are contiguous rows, the
(sublane, lane) tile layout Mosaic wants and a plain row-major tile for Triton). Valid slots
per row: kv_start[b] <= s < kv_end[b] (the generation engine pads rows on the left or the
right). A row with no valid slot returns zeros and logsumexp MASK_VALUE.

`decode_attention_xla`: a grouped einsum over the whole cache (XLA fuses the mask).
`decode_attention_pallas`: flash-decoding. With one query token there is little work per
(row, kv head), so the cache length S is split into chunks processed by separate programs
(grid B x K x splits); each writes a partial output and its logsumexp, and a small JAX
reduction rescales and sums them. Each program handles all G query heads of its kv head
at once (GQA through the index map, the cache is read once per kv head), and reads only the
blocks of its chunk that overlap its row's valid range. One kernel body serves both targets:
"gpu" launches it through Triton (`launch.triton_call`), "tpu" through Mosaic with the row
bounds in SMEM; every value in the body is 2-D, as Mosaic needs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import MASK_VALUE, check_decode_inputs, default_scale, pad_axis
from .errors import AttentionInputError
from .launch import triton_call
from .tiles import F32, dot_nn, dot_nt

MAX_SPLITS = 16  # enough programs to give every SM / core work at small batch
TARGETS = ("gpu", "tpu")


def decode_attention_xla(
    q_BHD: jax.Array,
    k_cache_BKSD: jax.Array,
    v_cache_BKSD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    scale: float | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """-> o [B, H, D], with `return_lse` also the logsumexp [B, H] (as the Pallas kernel)."""
    B, S, H, K, D = check_decode_inputs(q_BHD, k_cache_BKSD, v_cache_BKSD, kv_start_B, kv_end_B)
    scale = default_scale(D, scale)
    q_BKGD = q_BHD.reshape(B, K, H // K, D).astype(k_cache_BKSD.dtype)
    s_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_cache_BKSD, preferred_element_type=F32)
    pos_S = jnp.arange(S)
    valid_BS = (pos_S[None] >= kv_start_B[:, None]) & (pos_S[None] < kv_end_B[:, None])
    s_BKGS = jnp.where(valid_BS[:, None, None], s_BKGS * scale, MASK_VALUE)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.where(valid_BS[:, None, None], jnp.exp(s_BKGS - m_BKG1), 0.0)
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    o_BKGD = jnp.einsum(
        "bkgs,bksd->bkgd",
        p_BKGS.astype(v_cache_BKSD.dtype),
        v_cache_BKSD,
        preferred_element_type=F32,
    )
    empty = l_BKG1 == 0
    o_BHD = (o_BKGD / jnp.where(empty, 1.0, l_BKG1)).reshape(B, H, D).astype(q_BHD.dtype)
    if not return_lse:
        return o_BHD
    lse_BKG1 = jnp.where(empty, MASK_VALUE, m_BKG1 + jnp.log(jnp.where(empty, 1.0, l_BKG1)))
    return o_BHD, lse_BKG1.reshape(B, H)


def decode_splits(S: int, block_k: int) -> int:
    """Number of S-chunks: the largest divisor of the block count up to MAX_SPLITS, so a cache
    whose length is a multiple of block_k is never padded (padding would copy the cache)."""
    n_blocks = -(-S // block_k)
    return max(d for d in range(1, min(n_blocks, MAX_SPLITS) + 1) if n_blocks % d == 0)


def decode_attention_pallas(
    q_BHD: jax.Array,
    k_cache_BKSD: jax.Array,
    v_cache_BKSD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    scale: float | None = None,
    target: str = "gpu",
    block_k: int | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """-> o [B, H, D] (q's dtype), and with `return_lse` also the f32 logsumexp [B, H] of the
    scaled scores over the valid slots (MASK_VALUE for an empty row), so a caller can merge
    more keys into the softmax. `interpret` (gpu target): None = per lowering platform.
    `block_k` None: the largest of 64 / 32 / 16 slots that divides S, so the cache is not
    padded (a padded cache is a copy of it every step)."""
    B, S, H, K, D = check_decode_inputs(q_BHD, k_cache_BKSD, v_cache_BKSD, kv_start_B, kv_end_B)
    if target not in TARGETS:
        raise AttentionInputError(f"decode_attention: target must be one of {TARGETS}: {target!r}")
    if block_k is None:
        block_k = next((b for b in (64, 32, 16) if S % b == 0), 64)
    if block_k < 16 or block_k & (block_k - 1):
        raise AttentionInputError(f"decode_attention: block_k={block_k} must be a power of 2 >= 16")
    G = H // K
    n_blocks = -(-S // block_k)
    splits = max(1, min(num_splits or decode_splits(S, block_k), n_blocks))
    blocks_per_split = -(-n_blocks // splits)
    split_len = blocks_per_split * block_k
    Sp = split_len * splits
    Gp = max(16, 1 << (G - 1).bit_length())  # tensor-core / MXU matmuls want >= 16 rows
    Dp = 1 << (D - 1).bit_length() if target == "gpu" else D  # Triton tiles are powers of 2
    q = pad_axis(pad_axis(q_BHD.reshape(B, K, G, D).astype(k_cache_BKSD.dtype), 2, Gp), 3, Dp)
    k, v = (pad_axis(pad_axis(c, 2, Sp), 3, Dp) for c in (k_cache_BKSD, v_cache_BKSD))
    kernel = functools.partial(
        _decode_kernel,
        scale=default_scale(D, scale),
        block_k=block_k,
        blocks_per_split=blocks_per_split,
        row_bounds=_gpu_bounds if target == "gpu" else _tpu_bounds,
    )
    cache_spec = pl.BlockSpec(
        (pl.squeezed, pl.squeezed, split_len, Dp), lambda b, h, s: (b, h, s, 0)
    )
    specs = dict(
        grid=(B, K, splits),
        out_specs=[
            pl.BlockSpec(
                (pl.squeezed, pl.squeezed, pl.squeezed, Gp, Dp), lambda b, h, s: (b, h, s, 0, 0)
            ),
            pl.BlockSpec(
                (pl.squeezed, pl.squeezed, pl.squeezed, Gp, 1), lambda b, h, s: (b, h, s, 0, 0)
            ),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, Gp, Dp), F32),
            jax.ShapeDtypeStruct((B, K, splits, Gp, 1), F32),
        ],
        name="flash_decode",
    )
    q_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, Gp, Dp), lambda b, h, s: (b, h, 0, 0))
    bounds_B2 = jnp.stack([kv_start_B, kv_end_B], axis=1).astype(jnp.int32)
    if target == "gpu":
        bounds_spec = pl.BlockSpec((pl.squeezed, 2), lambda b, h, s: (b, 0))
        call = triton_call(
            kernel,
            interpret=interpret,
            in_specs=[bounds_spec, q_spec, cache_spec, cache_spec],
            **specs,
        )
    else:
        call = pl.pallas_call(
            kernel,
            in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), q_spec, cache_spec, cache_spec],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel")
            ),
            **specs,
        )
    o_part, lse_part = call(bounds_B2, q, k, v)
    o_BKGD, lse_BKG = _combine_splits(o_part, lse_part[..., 0])
    o_BHD = o_BKGD[:, :, :G, :D].reshape(B, H, D).astype(q_BHD.dtype)
    if not return_lse:
        return o_BHD
    return o_BHD, lse_BKG[:, :, :G].reshape(B, H)


def _gpu_bounds(bounds_ref):
    return bounds_ref[0], bounds_ref[1]  # this row's (2,) block


def _tpu_bounds(bounds_ref):
    b = pl.program_id(0)
    return bounds_ref[b, 0], bounds_ref[b, 1]  # the whole [B, 2] table in SMEM


def _decode_kernel(
    bounds_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k, blocks_per_split, row_bounds
):
    split_start = pl.program_id(2) * blocks_per_split * block_k
    start, end = row_bounds(bounds_ref)
    q_GD = q_ref[...]
    # Only the blocks of this split that overlap [start, end) are read.
    lo = jnp.clip((start - split_start) // block_k, 0, blocks_per_split)
    hi = jnp.clip(pl.cdiv(end - split_start, block_k), 0, blocks_per_split)

    def body(c, carry):
        m_G1, l_G1, acc_GD = carry
        off = pl.multiple_of(c * block_k, block_k)
        k_CD = k_ref[pl.ds(off, block_k), :]
        v_CD = v_ref[pl.ds(off, block_k), :]
        pos_1C = split_start + off + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        valid_1C = (pos_1C >= start) & (pos_1C < end)
        s_GC = jnp.where(valid_1C, dot_nt(q_GD, k_CD) * scale, MASK_VALUE)
        m_new = jnp.maximum(m_G1, jnp.max(s_GC, axis=1, keepdims=True))
        alpha = jnp.exp(m_G1 - m_new)
        p_GC = jnp.where(valid_1C, jnp.exp(s_GC - m_new), 0.0)
        acc_GD = alpha * acc_GD + dot_nn(p_GC.astype(v_CD.dtype), v_CD)
        return m_new, alpha * l_G1 + jnp.sum(p_GC, axis=1, keepdims=True), acc_GD

    G = q_GD.shape[0]
    init = (jnp.full((G, 1), MASK_VALUE, F32), jnp.zeros((G, 1), F32), jnp.zeros(q_GD.shape, F32))
    m_G1, l_G1, acc_GD = jax.lax.fori_loop(lo, hi, body, init)
    empty = l_G1 == 0
    safe_l = jnp.where(empty, 1.0, l_G1)
    o_ref[...] = acc_GD / safe_l
    lse_ref[...] = jnp.where(empty, MASK_VALUE, m_G1 + jnp.log(safe_l))


def _combine_splits(o_BKNGD: jax.Array, lse_BKNG: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merge per-split softmax results: weights exp(lse_split - lse_max); empty splits get 0.
    -> (o [B, K, G, D], lse [B, K, G])."""
    m_BKG = jnp.max(lse_BKNG, axis=2)
    w_BKNG = jnp.where(lse_BKNG > MASK_VALUE / 2, jnp.exp(lse_BKNG - m_BKG[:, :, None]), 0.0)
    total_BKG = jnp.sum(w_BKNG, axis=2)
    o_BKGD = jnp.einsum("bkng,bkngd->bkgd", w_BKNG, o_BKNGD)
    empty = total_BKG == 0
    lse_BKG = jnp.where(empty, MASK_VALUE, m_BKG + jnp.log(jnp.where(empty, 1.0, total_BKG)))
    return o_BKGD / jnp.where(empty, 1.0, total_BKG)[..., None], lse_BKG
