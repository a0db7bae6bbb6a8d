"""Flash attention for GPUs: Pallas kernels written for the Triton lowering.

Forward: grid (B, H, q blocks); each program streams the kv blocks of its kv head
(h // G through the BlockSpec index map: GQA without repeating K/V) with an online softmax in
f32 and writes o and the logsumexp. Causal programs stop at the diagonal.
Backward: two kernels, so no atomics are needed: dq over grid (B, H, q blocks), and dk/dv over
grid (B, K, kv blocks), which loops over the G query heads of its kv head and the q blocks at
or below the diagonal and so sums the GQA group in registers.

Triton wants power-of-two tiles: head_dim 80/96 is zero-padded to 128 (q.k and p.v are
unchanged by zero columns), the sequence is padded to the block and the tail masked.
Launched through `launch.triton_call`: Triton backend, interpreted when lowered for CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import MASK_VALUE, check_attention_inputs, pad_axis
from .errors import AttentionInputError, UnsupportedAttentionError
from .flash_vjp import flash_with_vjp
from .launch import triton_call
from .tiles import F32, FlashTiling, dot_nn, dot_nt, dot_tn, masked, tile_mask

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
# 64 x 64 tiles: q, k, v, o tiles of 64 x 128 bf16 plus a 64 x 64 f32 score tile fit the
# ~100-228 KiB of shared memory per SM with two pipeline stages (see docs/kernels.md).
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64


@dataclasses.dataclass(frozen=True)
class _Cfg(FlashTiling):
    interpret: bool | None  # None: per lowering platform (launch.triton_call)


def flash_attention_gpu(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: bool | None = None,
) -> jax.Array:
    _B, T, _, H, K, D = check_attention_inputs(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT)
    if D not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedAttentionError(
            f"pallas GPU attention: head_dim {D} not supported (supported: {SUPPORTED_HEAD_DIMS})"
        )
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise AttentionInputError(
                f"pallas GPU attention: {name}={b} must be a power of 2 >= 16"
            )
    Dp = 1 << (D - 1).bit_length()
    has_seg = segment_ids_BT is not None
    cfg = _Cfg.of(
        T,
        H,
        K,
        D,
        block_q,
        block_k,
        causal=causal,
        scale=scale,
        has_seg=has_seg,
        interpret=interpret,
    )
    q, k, v = (pad_axis(pad_axis(x, 3, Dp), 1, cfg.Tp) for x in (q_BTHD, k_BSKD, v_BSKD))
    o = _flash(cfg, q, k, v, cfg.pad_segments(segment_ids_BT))
    return o[:, :T, :, :D]


# ----------------------------------------------------------------------------- specs


def _seq_spec(block: int, Dp: int, index_map) -> pl.BlockSpec:
    """[B, Tp, heads, Dp] array, one (block x Dp) tile of one head."""
    return pl.BlockSpec((pl.squeezed, block, pl.squeezed, Dp), index_map)


def _kv_blocks(cfg: _Cfg, i: jax.Array) -> jax.Array | int:
    """How many kv blocks q block i visits: all of them, or up to the diagonal when causal."""
    if not cfg.causal:
        return cfg.nk
    return jnp.minimum(pl.cdiv((i + 1) * cfg.block_q, cfg.block_k), cfg.nk)


def _kv_tile(cfg: _Cfg, j, k_ref, v_ref, kseg_ref, q_pos_R, qseg_R):
    """kv block j for a q block (forward and dq kernels): its k and v tiles and the mask of
    the (q rows x kv columns) scores (causal, padded tail, segments)."""
    bk = cfg.block_k
    start = pl.multiple_of(j * bk, bk)
    k_CD = k_ref[pl.ds(start, bk), :]
    v_CD = v_ref[pl.ds(start, bk), :]
    kseg_C = kseg_ref[pl.ds(start, bk)] if cfg.has_seg else None
    mask = tile_mask(
        q_pos_R,
        start + jnp.arange(bk),
        causal=cfg.causal,
        kv_len=cfg.T,
        padded=cfg.padded,
        qseg_R=qseg_R,
        kseg_C=kseg_C,
    )
    return k_CD, v_CD, mask


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(cfg: _Cfg, *refs):
    if cfg.has_seg:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kseg_ref = None
    bq = cfg.block_q
    i = pl.program_id(2)
    q_RD = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    qseg = qseg_ref[...] if cfg.has_seg else None

    def body(j, carry):
        m_R, l_R, acc_RD = carry
        k_CD, v_CD, mask = _kv_tile(cfg, j, k_ref, v_ref, kseg_ref, q_pos, qseg)
        s_RC = masked(dot_nt(q_RD, k_CD) * cfg.scale, mask)
        m_new = jnp.maximum(m_R, jnp.max(s_RC, axis=1))
        alpha = jnp.exp(m_R - m_new)
        p_RC = jnp.exp(s_RC - m_new[:, None])
        l_new = alpha * l_R + jnp.sum(p_RC, axis=1)
        acc_RD = alpha[:, None] * acc_RD + dot_nn(p_RC.astype(v_CD.dtype), v_CD)
        return m_new, l_new, acc_RD

    hi = _kv_blocks(cfg, i)
    carry = (
        jnp.full((bq,), MASK_VALUE, F32),
        jnp.zeros((bq,), F32),
        jnp.zeros(q_RD.shape, F32),
    )
    m_R, l_R, acc_RD = jax.lax.fori_loop(0, hi, body, carry)
    o_ref[...] = (acc_RD / l_R[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_R + jnp.log(l_R)


def _fwd_call(cfg: _Cfg, q, k, v, seg):
    B, Tp, H, Dp = q.shape
    G, bq = cfg.G, cfg.block_q
    in_specs = [
        _seq_spec(bq, Dp, lambda b, h, i: (b, i, h, 0)),
        _seq_spec(Tp, Dp, lambda b, h, i: (b, 0, h // G, 0)),
        _seq_spec(Tp, Dp, lambda b, h, i: (b, 0, h // G, 0)),
    ]
    args = [q, k, v]
    if cfg.has_seg:
        in_specs += [
            pl.BlockSpec((pl.squeezed, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((pl.squeezed, Tp), lambda b, h, i: (b, 0)),
        ]
        args += [seg, seg]
    return triton_call(
        functools.partial(_fwd_kernel, cfg),
        interpret=cfg.interpret,
        grid=(B, H, Tp // bq),
        in_specs=in_specs,
        out_specs=[
            _seq_spec(bq, Dp, lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((pl.squeezed, pl.squeezed, bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp), F32),
        ],
        name="flash_fwd_gpu",
    )(*args)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(cfg: _Cfg, *refs):
    if cfg.has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kseg_ref = None
    bq = cfg.block_q
    i = pl.program_id(2)
    q_RD, do_RD = q_ref[...], do_ref[...]
    lse_R, delta_R = lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    qseg = qseg_ref[...] if cfg.has_seg else None

    def body(j, dq_RD):
        k_CD, v_CD, mask = _kv_tile(cfg, j, k_ref, v_ref, kseg_ref, q_pos, qseg)
        p_RC = masked(jnp.exp(dot_nt(q_RD, k_CD) * cfg.scale - lse_R[:, None]), mask, 0.0)
        ds_RC = p_RC * (dot_nt(do_RD, v_CD) - delta_R[:, None])
        return dq_RD + dot_nn(ds_RC.astype(k_CD.dtype), k_CD)

    hi = _kv_blocks(cfg, i)
    dq_RD = jax.lax.fori_loop(0, hi, body, jnp.zeros(q_RD.shape, F32))
    dq_ref[...] = (dq_RD * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(cfg: _Cfg, *refs):
    if cfg.has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    j = pl.program_id(2)
    k_CD, v_CD = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    kseg = kseg_ref[...] if cfg.has_seg else None
    lo = (j * bk) // bq if cfg.causal else 0

    def q_block(g, i, carry):
        dk_CD, dv_CD = carry
        start = pl.multiple_of(i * bq, bq)
        q_RD = q_ref[pl.ds(start, bq), g, :]
        do_RD = do_ref[pl.ds(start, bq), g, :]
        lse_R = lse_ref[g, pl.ds(start, bq)]
        delta_R = delta_ref[g, pl.ds(start, bq)]
        qseg = qseg_ref[pl.ds(start, bq)] if cfg.has_seg else None
        mask = tile_mask(
            start + jnp.arange(bq),
            k_pos,
            causal=cfg.causal,
            kv_len=cfg.T,
            padded=cfg.padded,
            qseg_R=qseg,
            kseg_C=kseg,
        )
        p_RC = masked(jnp.exp(dot_nt(q_RD, k_CD) * cfg.scale - lse_R[:, None]), mask, 0.0)
        dv_CD = dv_CD + dot_tn(p_RC.astype(do_RD.dtype), do_RD)
        ds_RC = p_RC * (dot_nt(do_RD, v_CD) - delta_R[:, None])
        dk_CD = dk_CD + dot_tn(ds_RC.astype(q_RD.dtype), q_RD)
        return dk_CD, dv_CD

    def per_head(g, carry):
        return jax.lax.fori_loop(lo, cfg.nq, functools.partial(q_block, g), carry)

    zeros = jnp.zeros(k_CD.shape, F32)
    dk_CD, dv_CD = jax.lax.fori_loop(0, cfg.G, per_head, (zeros, zeros))
    dk_ref[...] = (dk_CD * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CD.astype(dv_ref.dtype)


def _bwd_calls(cfg: _Cfg, q, k, v, seg, o, lse, do):
    B, Tp, H, Dp = q.shape
    K = k.shape[2]
    G, bq, bk = cfg.G, cfg.block_q, cfg.block_k
    delta = jnp.einsum("bthd,bthd->bht", o.astype(F32), do.astype(F32))

    dq_specs = [
        _seq_spec(bq, Dp, lambda b, h, i: (b, i, h, 0)),
        _seq_spec(Tp, Dp, lambda b, h, i: (b, 0, h // G, 0)),
        _seq_spec(Tp, Dp, lambda b, h, i: (b, 0, h // G, 0)),
        _seq_spec(bq, Dp, lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((pl.squeezed, pl.squeezed, bq), lambda b, h, i: (b, h, i)),
        pl.BlockSpec((pl.squeezed, pl.squeezed, bq), lambda b, h, i: (b, h, i)),
    ]
    dq_args = [q, k, v, do, lse, delta]
    if cfg.has_seg:
        dq_specs += [
            pl.BlockSpec((pl.squeezed, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((pl.squeezed, Tp), lambda b, h, i: (b, 0)),
        ]
        dq_args += [seg, seg]
    dq = triton_call(
        functools.partial(_dq_kernel, cfg),
        interpret=cfg.interpret,
        grid=(B, H, Tp // bq),
        in_specs=dq_specs,
        out_specs=_seq_spec(bq, Dp, lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_bwd_dq_gpu",
    )(*dq_args)

    # The dk/dv kernel sees the G query heads of one kv head: view heads as [K, G].
    group = lambda x: x.reshape(B, Tp, K, G, Dp)
    q_grp_spec = pl.BlockSpec(
        (pl.squeezed, Tp, pl.squeezed, G, Dp), lambda b, kh, j: (b, 0, kh, 0, 0)
    )
    stat_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, G, Tp), lambda b, kh, j: (b, kh, 0, 0))
    kv_specs = [
        q_grp_spec,
        _seq_spec(bk, Dp, lambda b, kh, j: (b, j, kh, 0)),
        _seq_spec(bk, Dp, lambda b, kh, j: (b, j, kh, 0)),
        q_grp_spec,
        stat_spec,
        stat_spec,
    ]
    kv_args = [group(q), k, v, group(do), lse.reshape(B, K, G, Tp), delta.reshape(B, K, G, Tp)]
    if cfg.has_seg:
        kv_specs += [
            pl.BlockSpec((pl.squeezed, Tp), lambda b, kh, j: (b, 0)),
            pl.BlockSpec((pl.squeezed, bk), lambda b, kh, j: (b, j)),
        ]
        kv_args += [seg, seg]
    dk, dv = triton_call(
        functools.partial(_dkdv_kernel, cfg),
        interpret=cfg.interpret,
        grid=(B, K, Tp // bk),
        in_specs=kv_specs,
        out_specs=[
            _seq_spec(bk, Dp, lambda b, kh, j: (b, j, kh, 0)),
            _seq_spec(bk, Dp, lambda b, kh, j: (b, j, kh, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        name="flash_bwd_dkdv_gpu",
    )(*kv_args)
    return dq, dk, dv


_flash = flash_with_vjp(_fwd_call, _bwd_calls)
