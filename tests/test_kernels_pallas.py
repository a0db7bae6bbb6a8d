"""Pallas flash attention (GPU kernel with interpret=True, TPU kernel in TPU interpret mode):
outputs and dq/dk/dv vs the reference. Interpret mode runs every grid step on the host, so
shapes are tiny and blocks small (16/32) to still cross several blocks and a padded tail."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from cmat_jax_kernels.errors import AttentionInputError, UnsupportedAttentionError
from cmat_jax_kernels.flash_gpu import flash_attention_gpu
from cmat_jax_kernels.flash_tpu import flash_attention_tpu
from jax.experimental.pallas import tpu as pltpu

from .test_kernels_common import assert_close, make_inputs, out_and_grads, reference_out_and_grads

# (B, T, H, K, D, causal, segments, dtype)
GPU_CASES = [
    (2, 17, 4, 4, 64, True, False, jnp.float32),
    (1, 40, 6, 2, 80, True, True, jnp.bfloat16),
    (1, 33, 8, 1, 128, False, True, jnp.float32),
    (1, 64, 3, 1, 96, False, False, jnp.bfloat16),
    (1, 50, 8, 2, 64, True, True, jnp.float32),
]
TPU_CASES = [
    (1, 40, 3, 1, 64, True, True, jnp.float32),
    (1, 33, 2, 2, 80, False, False, jnp.bfloat16),
    (1, 24, 4, 1, 128, False, True, jnp.float32),
]
FIELDS = ("B", "T", "H", "K", "D", "causal", "segments", "dtype")


def _check(fn, B, T, H, K, D, causal, segments, dtype):
    q, k, v, do, seg = make_inputs(B, T, H, K, D, dtype, segments=segments)
    attn = lambda q, k, v: fn(q, k, v, segment_ids_BT=seg, causal=causal)
    got = jax.jit(lambda q, k, v, do: out_and_grads(attn, q, k, v, do))(q, k, v, do)
    assert_close(got, reference_out_and_grads(q, k, v, do, seg, causal), dtype)


@pytest.mark.parametrize(FIELDS, GPU_CASES)
def test_gpu_kernel_interpret_matches_reference(B, T, H, K, D, causal, segments, dtype):
    fn = lambda *a, **kw: flash_attention_gpu(*a, block_q=16, block_k=32, interpret=True, **kw)
    _check(fn, B, T, H, K, D, causal, segments, dtype)


@pytest.mark.parametrize(FIELDS, TPU_CASES)
def test_tpu_kernel_interpret_matches_reference(B, T, H, K, D, causal, segments, dtype):
    fn = lambda *a, **kw: flash_attention_tpu(*a, block_q=16, block_k=32, **kw)
    with pltpu.force_tpu_interpret_mode():
        _check(fn, B, T, H, K, D, causal, segments, dtype)


def test_kernels_reject_unsupported_head_dim_and_blocks():
    q, k, v, _, _ = make_inputs(1, 16, 2, 1, 48, jnp.float32, segments=False)
    with pytest.raises(UnsupportedAttentionError, match="head_dim 48"):
        flash_attention_gpu(q, k, v, interpret=True)
    with pytest.raises(UnsupportedAttentionError, match="head_dim 48"):
        flash_attention_tpu(q, k, v)
    q, k, v, _, _ = make_inputs(1, 16, 2, 1, 64, jnp.float32, segments=False)
    with pytest.raises(AttentionInputError, match="block_q=24"):
        flash_attention_gpu(q, k, v, block_q=24, interpret=True)
    with pytest.raises(AttentionInputError, match="block_q=12"):
        flash_attention_tpu(q, k, v, block_q=12, block_k=32)
