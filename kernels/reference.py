"""Pure-JAX reference attention: materializes the [T, S] scores in f32. Ground truth for tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import (
    MASK_VALUE,
    attention_mask_BTS,
    check_attention_inputs,
    check_decode_inputs,
    default_scale,
)


def reference_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention computed in f32 from the (upcast) inputs."""
    B, T, S, H, K, D = check_attention_inputs(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT)
    scale = default_scale(D, scale)
    G = H // K
    q_BTKGD = q_BTHD.astype(jnp.float32).reshape(B, T, K, G, D)
    k_BSKD32 = k_BSKD.astype(jnp.float32)
    v_BSKD32 = v_BSKD.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD32, precision=hi) * scale
    mask_BTS = attention_mask_BTS(B, T, S, segment_ids_BT, causal)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, MASK_VALUE)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS, v_BSKD32, precision=hi)
    return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)


def reference_decode_attention(
    q_BHD: jax.Array,
    k_cache_BKSD: jax.Array,
    v_cache_BKSD: jax.Array,
    *,
    kv_start_B: jax.Array,
    kv_end_B: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """One query token per row over cache slots kv_start <= s < kv_end; empty rows give 0."""
    B, S, H, K, D = check_decode_inputs(q_BHD, k_cache_BKSD, v_cache_BKSD, kv_start_B, kv_end_B)
    scale = default_scale(D, scale)
    G = H // K
    q_BKGD = q_BHD.astype(jnp.float32).reshape(B, K, G, D)
    hi = jax.lax.Precision.HIGHEST
    s_BKGS = (
        jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_cache_BKSD.astype(jnp.float32), precision=hi)
        * scale
    )
    pos_S = jnp.arange(S)
    valid_BS = (pos_S[None] >= kv_start_B[:, None]) & (pos_S[None] < kv_end_B[:, None])
    s_BKGS = jnp.where(valid_BS[:, None, None], s_BKGS, -jnp.inf)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0))
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    o_BKGD = jnp.einsum(
        "bkgs,bksd->bkgd", p_BKGS, v_cache_BKSD.astype(jnp.float32), precision=hi
    ) / jnp.where(l_BKG1 == 0, 1.0, l_BKG1)
    return o_BKGD.reshape(B, H, D).astype(q_BHD.dtype)
