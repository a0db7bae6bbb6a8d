"""tools/bench_accel.py: on CPU it says it needs an accelerator and exits 2; its TPU peer (the
splash kernel wrapped for GQA, run interpreted) computes the same attention as ours."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from cmat_jax_kernels.reference import reference_attention

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def test_on_cpu_it_needs_an_accelerator_and_exits_2():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "bench_accel.py")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "tools/bench_accel.py: needs a GPU or TPU; JAX's backend here is 'cpu'"
    ]


def test_splash_peer_is_grouped_query_causal_attention():
    sys.path.insert(0, str(TOOLS))
    try:
        from bench_accel import _splash_peer
    finally:
        sys.path.remove(str(TOOLS))
    T, H, K, D = 128, 4, 2, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, T, H, D))
    k, v = (jax.random.normal(x, (1, T, K, D)) for x in ks[1:])
    got = jax.jit(_splash_peer(T, H, K, D, interpret=True))(q, k, v)
    want = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
