"""Flash attention for TPUs: Pallas kernels written for the Mosaic lowering.

TPU style: the kv-block loop is the innermost ("arbitrary") grid axis, so the Pallas pipeline
double-buffers the HBM->VMEM copies of the next k/v tile while the MXU works on this one;
the softmax statistics and the output accumulator live in VMEM scratch across that axis.
Causal tiles above the diagonal are skipped twice: `pl.when` skips the compute, and the
index map clamps the block index to the last needed tile, so the pipeline sees an unchanged
block and issues no copy. GQA: the k/v index map sends query head h to kv head h // G.

Layout is head-major ([B, H, T, D]) so a tile's last two dims are (sequence, head_dim), the
(sublane, lane) layout Mosaic needs. Backward: a dq kernel (grid B, H, q blocks, kv blocks)
and a dk/dv kernel (grid B, K, kv blocks, G, q blocks) that sums the GQA group in scratch.
On CPU the kernels run inside `pltpu.force_tpu_interpret_mode()`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import MASK_VALUE, check_attention_inputs, pad_axis, round_up, segments_visible
from .errors import AttentionInputError, UnsupportedAttentionError
from .flash_vjp import flash_with_vjp
from .tiles import FlashTiling

F32 = jnp.float32
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
# 512 x 512 tiles: a 512 x 512 f32 score tile (1 MiB) + double-buffered q/k/v/o tiles of
# 512 x 128 bf16 (~1 MiB) stay well inside the 16-32 MiB scoped VMEM; 128-multiples match
# the MXU (128 x 128 on v4/v5e, 256 x 256 on v6e). See docs/kernels.md.
DEFAULT_BLOCK = 512


def flash_attention_tpu(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    _, T, _, H, K, D = check_attention_inputs(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT)
    if D not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedAttentionError(
            f"pallas TPU attention: head_dim {D} not supported (supported: {SUPPORTED_HEAD_DIMS})"
        )
    auto = min(DEFAULT_BLOCK, round_up(T, 128))
    bq = auto if block_q is None else int(block_q)
    bk = auto if block_k is None else int(block_k)
    if bq % 8 or bk % 8 or max(bq, bk) % min(bq, bk):
        raise AttentionInputError(
            f"pallas TPU attention: block_q={bq}, block_k={bk} must be multiples of 8 "
            "and one must divide the other"
        )
    has_seg = segment_ids_BT is not None
    cfg = FlashTiling.of(T, H, K, D, bq, bk, causal=causal, scale=scale, has_seg=has_seg)
    q, k, v = (pad_axis(x, 1, cfg.Tp).transpose(0, 2, 1, 3) for x in (q_BTHD, k_BSKD, v_BSKD))
    o_BHTD = _flash(cfg, q, k, v, cfg.pad_segments(segment_ids_BT))
    return o_BHTD.transpose(0, 2, 1, 3)[:, :T]


# ----------------------------------------------------------------------------- tiles


def _visible(cfg: FlashTiling, i, j):
    """Does q block i see any key of kv block j?"""
    if not cfg.causal:
        return True
    return j * cfg.block_k <= i * cfg.block_q + cfg.block_q - 1


def _last_k_block(cfg: FlashTiling, i):
    return ((i + 1) * cfg.block_q - 1) // cfg.block_k


def _first_q_block(cfg: FlashTiling, j):
    return (j * cfg.block_k) // cfg.block_q


def _mask(cfg: FlashTiling, i, j, qseg_ref, kseg_ref):
    """Bool [bq, bk] or None, from 2-D iotas (the TPU-friendly form)."""
    shape = (cfg.block_q, cfg.block_k)
    mask = None
    k_pos = j * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    if cfg.causal:
        q_pos = i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        mask = q_pos >= k_pos
    elif cfg.padded:
        mask = k_pos < cfg.T
    if qseg_ref is not None:
        same = segments_visible(qseg_ref[...], kseg_ref[...])  # [bq, 1] x [1, bk]
        mask = same if mask is None else mask & same
    return mask


def _scores(cfg, q, k, mask):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
    s = s * cfg.scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _probs(cfg, q, k, lse, mask):
    p = jnp.exp(_scores(cfg, q, k, None) - lse)
    return p if mask is None else jnp.where(mask, p, 0.0)


def _split(cfg, refs, n_in):
    """(inputs, qseg_ref, kseg_ref, rest) from a kernel's flat refs."""
    ins = refs[:n_in]
    if cfg.has_seg:
        return ins, refs[n_in], refs[n_in + 1], refs[n_in + 2 :]
    return ins, None, None, refs[n_in:]


def _params(*sem):
    return pltpu.CompilerParams(dimension_semantics=sem)


def _seg_specs(cfg, q_map, k_map):
    return [
        pl.BlockSpec((pl.squeezed, cfg.block_q, 1), q_map),
        pl.BlockSpec((pl.squeezed, 1, cfg.block_k), k_map),
    ]


def _seg_args(seg):
    return [seg[:, :, None], seg[:, None, :]]


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(cfg: FlashTiling, *refs):
    (q_ref, k_ref, v_ref), qseg_ref, kseg_ref, rest = _split(cfg, refs, 3)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(_visible(cfg, i, j))
    def _step():
        s = _scores(cfg, q_ref[...], k_ref[...], _mask(cfg, i, j, qseg_ref, kseg_ref))
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=F32
        )
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    @pl.when(j == cfg.nk - 1)
    def _finish():
        l_R1 = l_sc[...]
        o_ref[...] = (acc_sc[...] / l_R1).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_R1)


def _fwd_call(cfg: FlashTiling, q, k, v, seg):
    B, H, Tp, D = q.shape
    G, bq, bk = cfg.G, cfg.block_q, cfg.block_k

    def kv_block(i, j):
        return jnp.minimum(j, _last_k_block(cfg, i)) if cfg.causal else j

    q_map = lambda b, h, i, j: (b, h, i, 0)
    kv_map = lambda b, h, i, j: (b, h // G, kv_block(i, j), 0)
    in_specs = [
        pl.BlockSpec((pl.squeezed, pl.squeezed, bq, D), q_map),
        pl.BlockSpec((pl.squeezed, pl.squeezed, bk, D), kv_map),
        pl.BlockSpec((pl.squeezed, pl.squeezed, bk, D), kv_map),
    ]
    args = [q, k, v]
    if cfg.has_seg:
        in_specs += _seg_specs(
            cfg, lambda b, h, i, j: (b, i, 0), lambda b, h, i, j: (b, 0, kv_block(i, j))
        )
        args += _seg_args(seg)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid=(B, H, cfg.nq, cfg.nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((pl.squeezed, pl.squeezed, bq, D), q_map),
            pl.BlockSpec((pl.squeezed, pl.squeezed, bq, 1), q_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp, 1), F32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), F32),
            pltpu.VMEM((bq, 1), F32),
            pltpu.VMEM((bq, D), F32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        name="flash_fwd_tpu",
    )(*args)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(cfg: FlashTiling, *refs):
    ins, qseg_ref, kseg_ref, rest = _split(cfg, refs, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    dq_ref, dq_sc = rest
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, F32)

    @pl.when(_visible(cfg, i, j))
    def _step():
        k, v, do = k_ref[...], v_ref[...], do_ref[...]
        p = _probs(cfg, q_ref[...], k, lse_ref[...], _mask(cfg, i, j, qseg_ref, kseg_ref))
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        ds = (p * (dp - delta_ref[...])).astype(k.dtype)
        dq_sc[...] += jax.lax.dot_general(
            ds, k, (((1,), (0,)), ((), ())), preferred_element_type=F32
        )

    @pl.when(j == cfg.nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(cfg: FlashTiling, *refs):
    ins, qseg_ref, kseg_ref, rest = _split(cfg, refs, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    dk_ref, dv_ref, dk_sc, dv_sc = rest
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    @pl.when(_visible(cfg, i, j))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probs(cfg, q, k, lse_ref[...], _mask(cfg, i, j, qseg_ref, kseg_ref))
        tn = (((0,), (0,)), ((), ()))  # contract the query rows: p^T @ dO, ds^T @ q
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=F32)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        ds = (p * (dp - delta_ref[...])).astype(q.dtype)
        dk_sc[...] += jax.lax.dot_general(ds, q, tn, preferred_element_type=F32)

    @pl.when((g == cfg.G - 1) & (i == cfg.nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_calls(cfg: FlashTiling, q, k, v, seg, o, lse, do):
    B, H, _Tp, D = q.shape
    K = k.shape[1]
    G, bq, bk = cfg.G, cfg.block_q, cfg.block_k
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1, keepdims=True)  # [B, H, Tp, 1]
    q_tile = (pl.squeezed, pl.squeezed, bq, D)
    k_tile = (pl.squeezed, pl.squeezed, bk, D)
    stat_tile = (pl.squeezed, pl.squeezed, bq, 1)

    def kv_block(i, j):
        return jnp.minimum(j, _last_k_block(cfg, i)) if cfg.causal else j

    q_map = lambda b, h, i, j: (b, h, i, 0)
    kv_map = lambda b, h, i, j: (b, h // G, kv_block(i, j), 0)
    specs = [
        pl.BlockSpec(q_tile, q_map),
        pl.BlockSpec(k_tile, kv_map),
        pl.BlockSpec(k_tile, kv_map),
        pl.BlockSpec(q_tile, q_map),
        pl.BlockSpec(stat_tile, q_map),
        pl.BlockSpec(stat_tile, q_map),
    ]
    args = [q, k, v, do, lse, delta]
    if cfg.has_seg:
        specs += _seg_specs(
            cfg, lambda b, h, i, j: (b, i, 0), lambda b, h, i, j: (b, 0, kv_block(i, j))
        )
        args += _seg_args(seg)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg),
        grid=(B, H, cfg.nq, cfg.nk),
        in_specs=specs,
        out_specs=pl.BlockSpec(q_tile, q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), F32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        name="flash_bwd_dq_tpu",
    )(*args)

    def q_block(j, i):
        return jnp.maximum(i, _first_q_block(cfg, j)) if cfg.causal else i

    qg_map = lambda b, kh, j, g, i: (b, kh * G + g, q_block(j, i), 0)
    k_map = lambda b, kh, j, g, i: (b, kh, j, 0)
    specs = [
        pl.BlockSpec(q_tile, qg_map),
        pl.BlockSpec(k_tile, k_map),
        pl.BlockSpec(k_tile, k_map),
        pl.BlockSpec(q_tile, qg_map),
        pl.BlockSpec(stat_tile, qg_map),
        pl.BlockSpec(stat_tile, qg_map),
    ]
    if cfg.has_seg:
        specs += _seg_specs(
            cfg, lambda b, kh, j, g, i: (b, q_block(j, i), 0), lambda b, kh, j, g, i: (b, 0, j)
        )
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg),
        grid=(B, K, cfg.nk, G, cfg.nq),
        in_specs=specs,
        out_specs=[pl.BlockSpec(k_tile, k_map), pl.BlockSpec(k_tile, k_map)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        scratch_shapes=[pltpu.VMEM((bk, D), F32), pltpu.VMEM((bk, D), F32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        name="flash_bwd_dkdv_tpu",
    )(*args)
    return dq, dk, dv


_flash = flash_with_vjp(_fwd_call, _bwd_calls)
