"""Attention behind one function: the model calls `attention(...)`, the impl is a setting."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "pallas", "chunked", "auto")


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
    """Grouped-query attention. H query heads share K kv heads (H % K == 0)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    scale = D**-0.5 if scale is None else scale
    G = H // K
    q_BKGTD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    s_BKGTS = jnp.einsum(
        "bkgtd,bskd->bkgts", q_BKGTD, k_BSKD, preferred_element_type=jnp.float32
    ) * scale
    S = k_BSKD.shape[1]
    mask_BTS = jnp.ones((B, T, S), dtype=bool)
    if causal:
        mask_BTS &= jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)[None]
    if segment_ids_BT is not None:
        mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, -1e30)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BKGTD = jnp.einsum(
        "bkgts,bskd->bkgtd", p_BKGTS.astype(v_BSKD.dtype), v_BSKD,
        preferred_element_type=jnp.float32,
    )
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)
