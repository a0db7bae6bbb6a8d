"""Tile-level pieces shared by the Pallas kernels (traced inside kernel bodies)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .common import MASK_VALUE, default_scale, pad_axis, round_up, segments_visible

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FlashTiling:
    """Static geometry of a flash-attention launch (GPU and TPU kernels): the sequence T
    padded to Tp, G query heads per kv head, the tile edges and the masking. Frozen, so
    hashable: kernels take it through functools.partial."""

    T: int
    Tp: int
    G: int
    block_q: int
    block_k: int
    causal: bool
    scale: float
    has_seg: bool

    @classmethod
    def of(
        cls,
        T: int,
        H: int,
        K: int,
        D: int,
        block_q: int,
        block_k: int,
        *,
        causal: bool,
        scale: float | None,
        has_seg: bool,
        **extra,
    ):
        """The tiling of a [B, T, H, D] query over K kv heads: T padded to the larger block."""
        return cls(
            T=T,
            Tp=round_up(T, max(block_q, block_k)),
            G=H // K,
            block_q=block_q,
            block_k=block_k,
            causal=bool(causal),
            scale=default_scale(D, scale),
            has_seg=has_seg,
            **extra,
        )

    def pad_segments(self, segment_ids_BT: jax.Array | None) -> jax.Array | None:
        """Segment ids int32 [B, Tp]; the padded tail is -1, a segment no real token is in."""
        if segment_ids_BT is None:
            return None
        return pad_axis(segment_ids_BT.astype(jnp.int32), 1, self.Tp, value=-1)

    @property
    def nq(self) -> int:
        return self.Tp // self.block_q

    @property
    def nk(self) -> int:
        return self.Tp // self.block_k

    @property
    def padded(self) -> bool:
        return self.Tp != self.T


def tile_mask(
    q_pos_R: jax.Array,
    k_pos_C: jax.Array,
    *,
    causal: bool,
    kv_len: int,
    padded: bool,
    qseg_R: jax.Array | None = None,
    kseg_C: jax.Array | None = None,
) -> jax.Array | None:
    """Bool [R, C] visibility of a (query rows x key columns) tile, None when all visible."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        mask = both(mask, q_pos_R[:, None] >= k_pos_C[None, :])
    if padded and not causal:  # causal already hides keys past every real query
        mask = both(
            mask, jnp.broadcast_to(k_pos_C[None, :] < kv_len, (q_pos_R.shape[0], *k_pos_C.shape))
        )
    if qseg_R is not None:
        mask = both(mask, segments_visible(qseg_R[:, None], kseg_C[None, :]))
    return mask


def masked(s_RC: jax.Array, mask: jax.Array | None, fill: float = MASK_VALUE) -> jax.Array:
    return s_RC if mask is None else jnp.where(mask, s_RC, fill)


def dot_nt(a_RD: jax.Array, b_CD: jax.Array) -> jax.Array:
    """a @ b.T with f32 accumulation."""
    return jax.lax.dot_general(a_RD, b_CD, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def dot_nn(a_RC: jax.Array, b_CD: jax.Array) -> jax.Array:
    """a @ b with f32 accumulation."""
    return jax.lax.dot_general(a_RC, b_CD, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def dot_tn(a_RC: jax.Array, b_RD: jax.Array) -> jax.Array:
    """a.T @ b with f32 accumulation."""
    return jax.lax.dot_general(a_RC, b_RD, (((0,), (0,)), ((), ())), preferred_element_type=F32)
