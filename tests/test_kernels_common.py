"""Shared helpers for the attention kernel tests: inputs, the f32 reference, error metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from cmat_jax_kernels.common import SHARED_SEGMENT
from cmat_jax_kernels.reference import reference_attention

# Error metric: max |a - ref| / max(1, max |ref|), per output / gradient.
# f32 kernels reorder sums only; bf16 kernels round p and ds to bf16 before the matmuls
# (flash-style) and store bf16 outputs/grads, so allow ~3 bf16 ulps of the largest value.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2}


def make_inputs(B, T, H, K, D, dtype, *, segments: bool, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, H, D), jnp.float32).astype(dtype)
    seg = None
    if segments:  # packed rows: increasing ids with a padded (0) tail on row 0, and the
        # last row opening with a shared prefix every later segment sees
        ids = jnp.sort(jax.random.randint(ks[4], (B, T), 1, 4), axis=1)
        ids = ids.at[0, T - T // 4 :].set(0)
        ids = ids.at[-1, : max(1, T // 5)].set(SHARED_SEGMENT)
        seg = ids.astype(jnp.int32)
    return q, k, v, do, seg


def out_and_grads(fn, q, k, v, do):
    """fn(q, k, v) -> o; returns (o, dq, dk, dv) for the cotangent do."""
    o, vjp = jax.vjp(fn, q, k, v)
    return (o, *vjp(do))


def reference_out_and_grads(q, k, v, do, seg, causal):
    """f32 reference from the same (possibly bf16-rounded) inputs."""

    @jax.jit
    def run(q, k, v, do, seg):
        fn = lambda q, k, v: reference_attention(q, k, v, segment_ids_BT=seg, causal=causal)
        return out_and_grads(fn, *(x.astype(jnp.float32) for x in (q, k, v, do)))

    return run(q, k, v, do, seg)


def assert_close(got, want, dtype, names=("o", "dq", "dk", "dv")):
    tol = TOL[dtype]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.dtype == dtype, (name, g.dtype)
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)), name
        err = np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
