"""Decode attention: one new query token per row against the KV cache.

Valid cache slots per row: kv_start[b] <= s < kv_end[b] (the generation engine pads rows on
the left or the right). A row with no valid slot returns zeros.

`decode_attention_xla`: a grouped einsum over the whole cache (XLA fuses the mask).
`decode_attention_pallas`: flash-decoding. With one query token there is little work per
(row, kv head), so the cache length S is split into chunks processed by separate programs
(grid B x K x splits); each writes a partial output and its logsumexp, and a small JAX
reduction rescales and sums them. Each program handles all G query heads of its kv head
at once (GQA through the index map, the cache is read once per kv head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import MASK_VALUE, check_decode_inputs, default_scale, pad_axis
from .errors import AttentionInputError

F32 = jnp.float32


def decode_attention_xla(
    q_BHD: jax.Array,
    k_cache_BSKD: jax.Array,
    v_cache_BSKD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    B, S, H, K, D = check_decode_inputs(q_BHD, k_cache_BSKD, v_cache_BSKD, kv_start_B, kv_end_B)
    scale = default_scale(D, scale)
    q_BKGD = q_BHD.reshape(B, K, H // K, D).astype(k_cache_BSKD.dtype)
    s_BKGS = jnp.einsum("bkgd,bskd->bkgs", q_BKGD, k_cache_BSKD, preferred_element_type=F32)
    pos_S = jnp.arange(S)
    valid_BS = (pos_S[None] >= kv_start_B[:, None]) & (pos_S[None] < kv_end_B[:, None])
    s_BKGS = jnp.where(valid_BS[:, None, None], s_BKGS * scale, MASK_VALUE)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.where(valid_BS[:, None, None], jnp.exp(s_BKGS - m_BKG1), 0.0)
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    o_BKGD = jnp.einsum(
        "bkgs,bskd->bkgd",
        p_BKGS.astype(v_cache_BSKD.dtype),
        v_cache_BSKD,
        preferred_element_type=F32,
    )
    o_BKGD = o_BKGD / jnp.where(l_BKG1 == 0, 1.0, l_BKG1)
    return o_BKGD.reshape(B, H, D).astype(q_BHD.dtype)


def decode_attention_pallas(
    q_BHD: jax.Array,
    k_cache_BSKD: jax.Array,
    v_cache_BSKD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    scale: float | None = None,
    block_k: int = 64,
    num_splits: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    B, S, H, K, D = check_decode_inputs(q_BHD, k_cache_BSKD, v_cache_BSKD, kv_start_B, kv_end_B)
    if block_k < 16 or block_k & (block_k - 1):
        raise AttentionInputError(f"decode_attention: block_k={block_k} must be a power of 2 >= 16")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    G = H // K
    n_blocks = -(-S // block_k)
    # Enough splits to give ~every SM/core work at small batch, each at least one block.
    splits = num_splits or max(1, min(n_blocks, 16))
    blocks_per_split = -(-n_blocks // splits)
    split_len = blocks_per_split * block_k
    Sp = split_len * splits
    Gp = max(16, 1 << (G - 1).bit_length())  # tensor-core matmuls want >= 16 rows
    q = pad_axis(q_BHD.reshape(B, K, G, D).astype(k_cache_BSKD.dtype), 2, Gp)
    k = pad_axis(k_cache_BSKD, 1, Sp)
    v = pad_axis(v_cache_BSKD, 1, Sp)
    bounds_B2 = jnp.stack([kv_start_B, kv_end_B], axis=1).astype(jnp.int32)
    kernel = functools.partial(
        _decode_kernel,
        scale=default_scale(D, scale),
        block_k=block_k,
        blocks_per_split=blocks_per_split,
    )
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(B, K, splits),
        in_specs=[
            pl.BlockSpec((pl.squeezed, pl.squeezed, Gp, D), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((pl.squeezed, split_len, pl.squeezed, D), lambda b, h, s: (b, s, h, 0)),
            pl.BlockSpec((pl.squeezed, split_len, pl.squeezed, D), lambda b, h, s: (b, s, h, 0)),
            pl.BlockSpec((pl.squeezed, 2), lambda b, h, s: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec(
                (pl.squeezed, pl.squeezed, pl.squeezed, Gp, D), lambda b, h, s: (b, h, s, 0, 0)
            ),
            pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, Gp), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, Gp, D), F32),
            jax.ShapeDtypeStruct((B, K, splits, Gp), F32),
        ],
        interpret=interpret,
        name="flash_decode",
    )(q, k, v, bounds_B2)
    o_BKGD = _combine_splits(o_part, lse_part)[:, :, :G]
    return o_BKGD.reshape(B, H, D).astype(q_BHD.dtype)


def _decode_kernel(
    q_ref, k_ref, v_ref, bounds_ref, o_ref, lse_ref, *, scale, block_k, blocks_per_split
):
    split_start = pl.program_id(2) * blocks_per_split * block_k
    start, end = bounds_ref[0], bounds_ref[1]
    q_GD = q_ref[...]
    # Only the blocks of this split that overlap [start, end) are read.
    lo = jnp.clip((start - split_start) // block_k, 0, blocks_per_split)
    hi = jnp.clip(pl.cdiv(end - split_start, block_k), 0, blocks_per_split)

    def body(c, carry):
        m_G, l_G, acc_GD = carry
        off = pl.multiple_of(c * block_k, block_k)
        k_CD = k_ref[pl.ds(off, block_k), :]
        v_CD = v_ref[pl.ds(off, block_k), :]
        pos_C = split_start + off + jnp.arange(block_k)
        valid_C = (pos_C >= start) & (pos_C < end)
        s_GC = jax.lax.dot_general(q_GD, k_CD, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        s_GC = jnp.where(valid_C[None, :], s_GC * scale, MASK_VALUE)
        m_new = jnp.maximum(m_G, jnp.max(s_GC, axis=1))
        alpha = jnp.exp(m_G - m_new)
        p_GC = jnp.where(valid_C[None, :], jnp.exp(s_GC - m_new[:, None]), 0.0)
        pv = jax.lax.dot_general(
            p_GC.astype(v_CD.dtype), v_CD, (((1,), (0,)), ((), ())), preferred_element_type=F32
        )
        return m_new, alpha * l_G + jnp.sum(p_GC, axis=1), alpha[:, None] * acc_GD + pv

    G = q_GD.shape[0]
    init = (jnp.full((G,), MASK_VALUE, F32), jnp.zeros((G,), F32), jnp.zeros(q_GD.shape, F32))
    m_G, l_G, acc_GD = jax.lax.fori_loop(lo, hi, body, init)
    empty = l_G == 0
    o_ref[...] = acc_GD / jnp.where(empty, 1.0, l_G)[:, None]
    lse_ref[...] = jnp.where(empty, MASK_VALUE, m_G + jnp.log(jnp.where(empty, 1.0, l_G)))


def _combine_splits(o_BKNGD: jax.Array, lse_BKNG: jax.Array) -> jax.Array:
    """Merge per-split softmax results: weights exp(lse_split - lse_max); empty splits get 0."""
    m_BKG = jnp.max(lse_BKNG, axis=2)
    w_BKNG = jnp.where(lse_BKNG > MASK_VALUE / 2, jnp.exp(lse_BKNG - m_BKG[:, :, None]), 0.0)
    total_BKG = jnp.sum(w_BKNG, axis=2)
    o_BKGD = jnp.einsum("bkng,bkngd->bkgd", w_BKNG, o_BKNGD)
    return o_BKGD / jnp.where(total_BKG == 0, 1.0, total_BKG)[..., None]
