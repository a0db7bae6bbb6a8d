"""Chunked (pure-JAX blockwise) attention: outputs and dq/dk/dv vs the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cmat_jax_kernels.chunked import chunked_attention
from cmat_jax_kernels.reference import reference_attention

from .test_kernels_common import assert_close, make_inputs, out_and_grads, reference_out_and_grads

# Covering subset of causal x GQA ratio x segments x odd lengths x head_dim x dtype.
# (B, T, H, K, D, causal, segments, dtype, block)
CASES = [
    (2, 17, 4, 4, 64, True, False, jnp.float32, 16),
    (2, 64, 6, 2, 64, True, True, jnp.float32, 16),
    (1, 130, 8, 2, 80, True, False, jnp.bfloat16, 32),
    (2, 130, 8, 1, 128, False, True, jnp.float32, 32),
    (2, 33, 9, 3, 64, False, False, jnp.bfloat16, 16),
    (1, 64, 8, 1, 96, True, True, jnp.bfloat16, 16),
    (2, 130, 3, 1, 64, False, False, jnp.float32, 64),
    (1, 100, 4, 1, 80, True, True, jnp.float32, 32),
]


@pytest.mark.parametrize(("B", "T", "H", "K", "D", "causal", "segments", "dtype", "block"), CASES)
def test_chunked_matches_reference(B, T, H, K, D, causal, segments, dtype, block):
    q, k, v, do, seg = make_inputs(B, T, H, K, D, dtype, segments=segments)
    fn = lambda q, k, v: chunked_attention(
        q, k, v, segment_ids_BT=seg, causal=causal, block_size=block
    )
    got = jax.jit(lambda q, k, v, do: out_and_grads(fn, q, k, v, do))(q, k, v, do)
    assert_close(got, reference_out_and_grads(q, k, v, do, seg, causal), dtype)


def test_chunked_skips_blocks_above_the_diagonal():
    """Causal work grows ~T^2/2: the jaxpr's kv loop must stop at the diagonal."""
    q, k, v, _, _ = make_inputs(1, 64, 2, 1, 64, jnp.float32, segments=False)
    fn = lambda q: chunked_attention(q, k, v, causal=True, block_size=16)
    text = str(jax.make_jaxpr(fn)(q))
    assert "while" in text  # dynamic trip count: blocks j < i only, then the diagonal
    # Keys after a query must not influence it (no leak through skipped blocks).
    k2 = k.at[:, 40:].set(100.0)
    o1 = chunked_attention(q, k, v, causal=True, block_size=16)
    o2 = chunked_attention(q, k2, v, causal=True, block_size=16)
    np.testing.assert_array_equal(np.asarray(o1[:, :40]), np.asarray(o2[:, :40]))


def test_chunked_default_block_and_scale():
    q, k, v, do, _ = make_inputs(1, 300, 4, 2, 64, jnp.float32, segments=False)
    fn = lambda q, k, v: chunked_attention(q, k, v, scale=0.1)
    ref = lambda q, k, v: reference_attention(q, k, v, scale=0.1)
    got = jax.jit(lambda *a: out_and_grads(fn, *a))(q, k, v, do)
    want = jax.jit(lambda *a: out_and_grads(ref, *a))(q, k, v, do)
    assert_close(got, want, jnp.float32)
