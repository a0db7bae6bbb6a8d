"""Chunked (blockwise, flash-style) attention in pure JAX: the CPU training path.

O(T) memory: scores exist one [G*bq, bk] tile per (batch, kv head) at a time. Causal blocks
above the diagonal are never computed: the inner loop over kv blocks stops at the diagonal
(dynamic trip count), and only diagonal / tail / segment blocks pay for a mask.
Differentiable through a custom_vjp whose backward recomputes each tile (one pass over kv
blocks, inner pass over the q blocks at or below the diagonal, dq accumulated in a carry).

Layout: GQA stays grouped. q is blocked to [nq, B, K, G*bq, D] (the G query heads of a kv
head stacked as rows), k/v to [nk, B, K, bk, D], so every tile product is one batched
dot_general over (B, K) with G*bq rows: large contiguous matmuls and no repeated K/V.
Matmuls take the input dtype (bf16 stays bf16) and accumulate in f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .common import (
    MASK_VALUE,
    check_attention_inputs,
    default_scale,
    pad_axis,
    round_up,
    segments_visible,
)

F32 = jnp.float32


def default_block_size(T: int) -> int:
    """Tile edge for a sequence of length T (measured on a 2-core CPU, see docs/kernels.md)."""
    if T <= 256:
        return max(16, round_up(T, 16) // 2) if T > 64 else round_up(T, 16)
    return 128 if T <= 2048 else 256


def chunked_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Blockwise attention; same semantics as `reference.reference_attention`."""
    _B, T, _S, H, K, D = check_attention_inputs(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT)
    if k_BSKD.dtype != q_BTHD.dtype or v_BSKD.dtype != q_BTHD.dtype:
        raise ValueError(
            f"chunked_attention: q, k, v dtypes must match, got {q_BTHD.dtype}, "
            f"{k_BSKD.dtype}, {v_BSKD.dtype}"
        )
    bs = default_block_size(T) if block_size is None else int(block_size)
    if bs <= 0:
        raise ValueError(f"chunked_attention: block_size must be positive, got {bs}")
    cfg = _Config(
        T=T,
        K=K,
        G=H // K,
        block=bs,
        causal=bool(causal),
        scale=default_scale(D, scale),
        has_seg=segment_ids_BT is not None,
    )
    seg = segment_ids_BT.astype(jnp.int32) if segment_ids_BT is not None else None
    return _chunked(cfg, q_BTHD, k_BSKD, v_BSKD, seg)


class _Config:
    """Static settings of one call (hashable, so it can be a nondiff custom_vjp argument)."""

    def __init__(self, *, T, K, G, block, causal, scale, has_seg):
        self.T, self.K, self.G, self.block = T, K, G, block
        self.causal, self.scale, self.has_seg = causal, scale, has_seg
        self.n = round_up(T, block) // block
        self.padded = self.n * block != T

    def _key(self):
        return (self.T, self.K, self.G, self.block, self.causal, self.scale, self.has_seg)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Config) and self._key() == other._key()


# ----------------------------------------------------------------------------- layout


def _q_blocks(x_BTHD, cfg):
    B, _T, _H, D = x_BTHD.shape
    x = pad_axis(x_BTHD, 1, cfg.n * cfg.block)
    x = x.reshape(B, cfg.n, cfg.block, cfg.K, cfg.G, D).transpose(1, 0, 3, 4, 2, 5)
    return x.reshape(cfg.n, B, cfg.K, cfg.G * cfg.block, D)  # [n, B, K, G*bq, D]


def _q_unblock(x_NBKRD, cfg):
    n, B, K, _, D = x_NBKRD.shape
    x = x_NBKRD.reshape(n, B, K, cfg.G, cfg.block, D).transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(B, n * cfg.block, K * cfg.G, D)[:, : cfg.T]


def _kv_blocks(x_BSKD, cfg):
    B, _S, K, D = x_BSKD.shape
    x = pad_axis(x_BSKD, 1, cfg.n * cfg.block)
    return x.reshape(B, cfg.n, cfg.block, K, D).transpose(1, 0, 3, 2, 4)  # [n, B, K, bk, D]


def _kv_unblock(x_NBKCD, cfg):
    n, B, K, bk, D = x_NBKCD.shape
    return x_NBKCD.transpose(1, 0, 3, 2, 4).reshape(B, n * bk, K, D)[:, : cfg.T]


# ----------------------------------------------------------------------------- tiles


def _tile_mask(cfg, i, j, qseg_NBR, kseg_NBC, *, diag: bool, tail: bool):
    """Bool mask broadcastable to scores [B, K, G, bq, bk], or None when all visible."""
    bs = cfg.block
    mask = None
    if diag:  # bq == bk, so the diagonal tile compares local positions
        r = jax.lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
        c = jax.lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
        mask = (r >= c)[None, None, None]
    if tail:
        c = j * bs + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        m = (c < cfg.T)[None, None, None]
        mask = m if mask is None else mask & m
    if cfg.has_seg:
        qs_BR = jax.lax.dynamic_index_in_dim(qseg_NBR, i, 0, keepdims=False)
        ks_BC = jax.lax.dynamic_index_in_dim(kseg_NBC, j, 0, keepdims=False)
        m = segments_visible(qs_BR[:, :, None], ks_BC[:, None, :])[:, None, None]
        mask = m if mask is None else mask & m
    return mask


def _scores(cfg, q_BKRD, k_BKCD, mask):
    s_BKRC = jnp.einsum("bkrd,bkcd->bkrc", q_BKRD, k_BKCD, preferred_element_type=F32)
    s_BKRC = s_BKRC * cfg.scale
    if mask is None:
        return s_BKRC
    B, K, R, C = s_BKRC.shape
    s_BKGQC = s_BKRC.reshape(B, K, cfg.G, cfg.block, C)
    return jnp.where(mask, s_BKGQC, MASK_VALUE).reshape(B, K, R, C)


def _mask_probs(cfg, p_BKRC, mask):
    if mask is None:
        return p_BKRC
    B, K, R, C = p_BKRC.shape
    p = jnp.where(mask, p_BKRC.reshape(B, K, cfg.G, cfg.block, C), 0.0)
    return p.reshape(B, K, R, C)


def _kv_ranges(cfg, i):
    """(unmasked kv-block range [lo, hi), list of (j, diag, tail) masked blocks) for q block i."""
    if cfg.causal:
        return (0, i), [(i, True, False)]
    if cfg.padded:
        return (0, cfg.n - 1), [(cfg.n - 1, False, True)]
    return (0, cfg.n), []


# ----------------------------------------------------------------------------- forward


def _forward(cfg, q_NBKRD, k_NBKCD, v_NBKCD, qseg, kseg):
    _, B, K, R, D = q_NBKRD.shape

    def per_q_block(_, inputs):
        i, q_BKRD = inputs

        def step(j, carry, *, diag=False, tail=False):
            m_BKR, l_BKR, acc_BKRD = carry
            k_BKCD = jax.lax.dynamic_index_in_dim(k_NBKCD, j, 0, keepdims=False)
            v_BKCD = jax.lax.dynamic_index_in_dim(v_NBKCD, j, 0, keepdims=False)
            mask = _tile_mask(cfg, i, j, qseg, kseg, diag=diag, tail=tail)
            s_BKRC = _scores(cfg, q_BKRD, k_BKCD, mask)
            m_new = jnp.maximum(m_BKR, jnp.max(s_BKRC, axis=-1))
            alpha = jnp.exp(m_BKR - m_new)
            p_BKRC = jnp.exp(s_BKRC - m_new[..., None])
            l_new = alpha * l_BKR + jnp.sum(p_BKRC, axis=-1)
            pv_BKRD = jnp.einsum(
                "bkrc,bkcd->bkrd",
                p_BKRC.astype(v_BKCD.dtype),
                v_BKCD,
                preferred_element_type=F32,
            )
            return m_new, l_new, alpha[..., None] * acc_BKRD + pv_BKRD

        carry = (
            jnp.full((B, K, R), MASK_VALUE, F32),
            jnp.zeros((B, K, R), F32),
            jnp.zeros((B, K, R, D), F32),
        )
        (lo, hi), special = _kv_ranges(cfg, i)
        carry = jax.lax.fori_loop(lo, hi, step, carry)
        for j, diag, tail in special:
            carry = step(j, carry, diag=diag, tail=tail)
        m_BKR, l_BKR, acc_BKRD = carry
        o_BKRD = (acc_BKRD / l_BKR[..., None]).astype(q_BKRD.dtype)
        lse_BKR = m_BKR + jnp.log(l_BKR)
        return None, (o_BKRD, lse_BKR)

    _, (o_NBKRD, lse_NBKR) = jax.lax.scan(per_q_block, None, (jnp.arange(cfg.n), q_NBKRD))
    return o_NBKRD, lse_NBKR


def _segments(cfg, seg_BT):
    if seg_BT is None:
        return None, None
    s = pad_axis(seg_BT, 1, cfg.n * cfg.block, value=-1)
    s_NBC = s.reshape(s.shape[0], cfg.n, cfg.block).transpose(1, 0, 2)
    return s_NBC, s_NBC


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg, q_BTHD, k_BSKD, v_BSKD, seg_BT):
    o, _ = _chunked_fwd(cfg, q_BTHD, k_BSKD, v_BSKD, seg_BT)
    return o


def _chunked_fwd(cfg, q_BTHD, k_BSKD, v_BSKD, seg_BT):
    q_N = _q_blocks(q_BTHD, cfg)
    k_N = _kv_blocks(k_BSKD, cfg)
    v_N = _kv_blocks(v_BSKD, cfg)
    qseg, kseg = _segments(cfg, seg_BT)
    o_N, lse_N = _forward(cfg, q_N, k_N, v_N, qseg, kseg)
    return _q_unblock(o_N, cfg), (q_N, k_N, v_N, o_N, lse_N, seg_BT)


# ----------------------------------------------------------------------------- backward
#
# The backward works on transposed tiles (kv rows x query columns): every product is then a
# plain or NT matmul. A matmul contracting the lhs's leading dim (p^T @ dO from [R, C] tiles)
# runs ~3x slower on XLA:CPU, so dq is accumulated transposed, as k^T @ ds^T.


def _tile_mask_T(cfg, i, j, qseg_NBR, kseg_NBC, *, diag: bool, tail: bool):
    """Like `_tile_mask`, for transposed scores [B, K, bk, G, bq]."""
    bs = cfg.block
    mask = None
    if diag:
        c = jax.lax.broadcasted_iota(jnp.int32, (bs, 1, bs), 0)
        r = jax.lax.broadcasted_iota(jnp.int32, (bs, 1, bs), 2)
        mask = (r >= c)[None, None]
    if tail:
        c = j * bs + jax.lax.broadcasted_iota(jnp.int32, (bs, 1, 1), 0)
        m = (c < cfg.T)[None, None]
        mask = m if mask is None else mask & m
    if cfg.has_seg:
        qs_BR = jax.lax.dynamic_index_in_dim(qseg_NBR, i, 0, keepdims=False)
        ks_BC = jax.lax.dynamic_index_in_dim(kseg_NBC, j, 0, keepdims=False)
        m = segments_visible(qs_BR[:, None, None, :], ks_BC[:, :, None, None])[:, None]
        mask = m if mask is None else mask & m
    return mask


def _chunked_bwd(cfg, res, do_BTHD):
    q_N, k_N, v_N, o_N, lse_N, seg_BT = res
    qseg, kseg = _segments(cfg, seg_BT)
    do_N = _q_blocks(do_BTHD.astype(q_N.dtype), cfg)
    # delta_r = sum_d dO * O: the softmax-Jacobian term, one f32 per query row.
    delta_N = jnp.sum(do_N.astype(F32) * o_N.astype(F32), axis=-1)
    n, B, K, R, D = q_N.shape
    C = cfg.block
    dt = q_N.dtype

    def per_kv_block(dqT_N, inputs):
        j, k_BKCD, v_BKCD = inputs
        kT_BKDC = jnp.swapaxes(k_BKCD, -1, -2)

        def step(i, carry, *, diag=False, tail=False):
            dk_BKCD, dv_BKCD, dqT_N = carry
            q_BKRD = jax.lax.dynamic_index_in_dim(q_N, i, 0, keepdims=False)
            do_BKRD = jax.lax.dynamic_index_in_dim(do_N, i, 0, keepdims=False)
            lse_BKR = jax.lax.dynamic_index_in_dim(lse_N, i, 0, keepdims=False)
            delta_BKR = jax.lax.dynamic_index_in_dim(delta_N, i, 0, keepdims=False)
            mask = _tile_mask_T(cfg, i, j, qseg, kseg, diag=diag, tail=tail)
            sT_BKCR = jnp.einsum("bkcd,bkrd->bkcr", k_BKCD, q_BKRD, preferred_element_type=F32)
            pT_BKCR = jnp.exp(sT_BKCR * cfg.scale - lse_BKR[:, :, None, :])
            if mask is not None:
                pT = jnp.where(mask, pT_BKCR.reshape(B, K, C, cfg.G, C), 0.0)
                pT_BKCR = pT.reshape(B, K, C, R)
            dv_BKCD = dv_BKCD + jnp.einsum(
                "bkcr,bkrd->bkcd", pT_BKCR.astype(dt), do_BKRD, preferred_element_type=F32
            )
            dpT_BKCR = jnp.einsum("bkcd,bkrd->bkcr", v_BKCD, do_BKRD, preferred_element_type=F32)
            dsT_BKCR = (pT_BKCR * (dpT_BKCR - delta_BKR[:, :, None, :]) * cfg.scale).astype(dt)
            dk_BKCD = dk_BKCD + jnp.einsum(
                "bkcr,bkrd->bkcd", dsT_BKCR, q_BKRD, preferred_element_type=F32
            )
            dqT_BKDR = jnp.einsum("bkdc,bkcr->bkdr", kT_BKDC, dsT_BKCR, preferred_element_type=F32)
            dqT_old = jax.lax.dynamic_index_in_dim(dqT_N, i, 0, keepdims=True)
            dqT_N = jax.lax.dynamic_update_index_in_dim(dqT_N, dqT_old + dqT_BKDR[None], i, 0)
            return dk_BKCD, dv_BKCD, dqT_N

        carry = (jnp.zeros(k_BKCD.shape, F32), jnp.zeros(v_BKCD.shape, F32), dqT_N)
        if cfg.causal:
            carry = step(j, carry, diag=True)
            carry = jax.lax.fori_loop(j + 1, n, step, carry)
        elif cfg.padded:
            # Only the last kv block holds padding.
            carry = jax.lax.cond(
                j == n - 1,
                lambda c: jax.lax.fori_loop(0, n, functools.partial(step, tail=True), c),
                lambda c: jax.lax.fori_loop(0, n, step, c),
                carry,
            )
        else:
            carry = jax.lax.fori_loop(0, n, step, carry)
        dk_BKCD, dv_BKCD, dqT_N = carry
        return dqT_N, (dk_BKCD, dv_BKCD)

    dqT_N = jnp.zeros((n, B, K, D, R), F32)
    dqT_N, (dk_N, dv_N) = jax.lax.scan(per_kv_block, dqT_N, (jnp.arange(n), k_N, v_N))
    dq = _q_unblock(jnp.swapaxes(dqT_N, -1, -2).astype(dt), cfg)
    return dq, _kv_unblock(dk_N.astype(dt), cfg), _kv_unblock(dv_N.astype(dt), cfg), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
