"""Decode attention (XLA, and Pallas flash-decoding for the GPU and TPU targets in interpret
mode) vs the reference, caches in the KV-cache layout [B, K, S, D]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cmat_jax_kernels.decode import decode_attention_pallas, decode_attention_xla
from cmat_jax_kernels.errors import AttentionInputError
from cmat_jax_kernels.reference import reference_decode_attention
from jax.experimental.pallas import tpu as pltpu

# Rows: full cache, right-padded, left-padded, a single slot, empty (-> zeros).
STARTS = [0, 0, 37, 70, 5]
ENDS = [150, 41, 150, 71, 5]


@pytest.mark.parametrize(
    ("impl", "H", "K", "D", "dtype"),
    [
        ("xla", 6, 2, 64, jnp.float32),
        ("xla", 8, 1, 80, jnp.bfloat16),
        ("pallas", 6, 2, 64, jnp.float32),
        ("pallas", 8, 8, 128, jnp.bfloat16),
        ("pallas", 9, 3, 96, jnp.float32),
        ("pallas_tpu", 6, 2, 64, jnp.float32),
        ("pallas_tpu", 8, 2, 128, jnp.bfloat16),
    ],
)
def test_decode_matches_reference(impl, H, K, D, dtype):
    B, S = len(STARTS), 150
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (B, H, D)).astype(dtype)
    kc = jax.random.normal(ks[1], (B, K, S, D)).astype(dtype)
    vc = jax.random.normal(ks[2], (B, K, S, D)).astype(dtype)
    st, en = jnp.array(STARTS), jnp.array(ENDS)
    if impl == "xla":
        fn = decode_attention_xla
    else:
        target = "tpu" if impl == "pallas_tpu" else "gpu"
        fn = lambda *a, **kw: decode_attention_pallas(
            *a, block_k=16, num_splits=4, target=target, **kw
        )
    run = jax.jit(lambda *a: fn(*a[:3], kv_start_B=a[3], kv_end_B=a[4], return_lse=True))
    if impl == "pallas_tpu":
        with pltpu.force_tpu_interpret_mode():
            got, lse = run(q, kc, vc, st, en)
    else:
        got, lse = run(q, kc, vc, st, en)
    f32 = lambda x: x.astype(jnp.float32)
    want = reference_decode_attention(f32(q), f32(kc), f32(vc), kv_start_B=st, kv_end_B=en)
    assert got.dtype == dtype and got.shape == (B, H, D)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(got[4], np.float32), 0.0)  # empty row
    # logsumexp of the scaled scores over the valid slots (what a caller merges more keys with)
    s_BKGS = jnp.einsum("bkgd,bksd->bkgs", f32(q).reshape(B, K, H // K, D), f32(kc)) * D**-0.5
    valid = (jnp.arange(S) >= st[:, None]) & (jnp.arange(S) < en[:, None])
    s_BKGS = jnp.where(valid[:, None, None], s_BKGS, -jnp.inf)
    want_lse = jax.nn.logsumexp(s_BKGS[:4], axis=-1).reshape(4, H)
    np.testing.assert_allclose(np.asarray(lse[:4]), np.asarray(want_lse), atol=tol, rtol=tol)
    assert bool(jnp.all(lse[4] < -1e30))


def test_decode_rejects_bad_shapes():
    q = jnp.zeros((2, 6, 64))
    kc = jnp.zeros((2, 4, 32, 64))
    with pytest.raises(AttentionInputError, match="multiple of kv heads"):
        decode_attention_xla(q, kc, kc, kv_start_B=jnp.zeros(2, int), kv_end_B=jnp.ones(2, int))
    kc = jnp.zeros((2, 2, 32, 64))
    with pytest.raises(AttentionInputError, match="kv_end must have shape"):
        decode_attention_pallas(q, kc, kc, kv_start_B=jnp.zeros(2, int), kv_end_B=jnp.ones(3, int))
