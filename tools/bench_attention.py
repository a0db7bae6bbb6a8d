"""Attention benchmark (not a test). Last line: one JSON object.

CPU:  peak memory of jitted forward+backward at T=8192 for `chunked` vs `xla` (from XLA's
      buffer assignment: temp + argument + output bytes, so nothing that large is allocated),
      and the time of forward+backward at B=8, T=512, 9 q / 3 kv heads, D=64, bf16, causal for
      `chunked` vs jax.nn.dot_product_attention (interleaved runs, best of N).
      mem_ratio = chunked / xla peak bytes; speed_ratio = xla time / chunked time.
GPU/TPU: forward+backward TFLOP/s of impl='pallas' vs jax.nn.dot_product_attention
      (xla, and cudnn on GPU); ratio = ours / peer time-based speedup.

    python tools/bench_attention.py [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from cmat_jax.model.attention import attention


def _inputs(B, T, H, K, D, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.float32).astype(dtype)
    return q, k, v


def _fwd_bwd(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _peer(implementation=None):
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation
    )


def _ours(impl):
    return lambda q, k, v: attention(q, k, v, causal=True, impl=impl)


def peak_bytes(fn, args) -> int:
    mem = _fwd_bwd(fn).lower(*args).compile().memory_analysis()
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)


def best_times(fns: dict, args, reps: int) -> dict[str, float]:
    """Best-of-reps wall time per function, runs interleaved so load changes hit all alike."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def causal_flops(B, T, H, D) -> float:
    """fwd 2 matmuls + bwd 5 (with recompute), each 2*T*T*D per head, half for causal."""
    return 7 * 2 * B * H * T * T * D / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    backend = jax.default_backend()
    B, T, H, K, D = 8, 512, 9, 3, 64
    x = _inputs(B, T, H, K, D)
    if backend == "cpu":
        mem_args = _inputs(1, 8192, H, K, D)
        mem = {name: peak_bytes(_ours(name), mem_args) for name in ("xla", "chunked")}
        for name, b in mem.items():
            print(
                f"peak fwd+bwd memory T=8192 B=1 H={H} K={K} D={D} bf16  {name:8s} {b / 2**20:9.1f} MiB"
            )
        t = best_times(
            {"dot_product_attention": _fwd_bwd(_peer()), "chunked": _fwd_bwd(_ours("chunked"))},
            x,
            args.reps,
        )
        for name, s in t.items():
            gf = causal_flops(B, T, H, D) / s / 1e9
            print(
                f"fwd+bwd B={B} T={T} H={H} K={K} D={D} bf16 causal  {name:22s} {s * 1e3:8.1f} ms  {gf:6.1f} GFLOP/s"
            )
        result = {
            "backend": backend,
            "mem_ratio": mem["chunked"] / mem["xla"],
            "speed_ratio": t["dot_product_attention"] / t["chunked"],
            "chunked_s": t["chunked"],
            "xla_s": t["dot_product_attention"],
            "chunked_peak_bytes": mem["chunked"],
            "xla_peak_bytes": mem["xla"],
        }
    else:
        B, T, H, K, D = 4, 4096, 32, 8, 128
        x = _inputs(B, T, H, K, D)
        fns = {"pallas": _fwd_bwd(_ours("pallas")), "xla": _fwd_bwd(_peer("xla"))}
        if backend == "gpu":
            fns["cudnn"] = _fwd_bwd(_peer("cudnn"))
        t = best_times(fns, x, args.reps)
        flops = causal_flops(B, T, H, D)
        for name, s in t.items():
            print(
                f"fwd+bwd B={B} T={T} H={H} K={K} D={D} bf16 causal {name:8s} {s * 1e3:8.2f} ms {flops / s / 1e12:7.1f} TFLOP/s"
            )
        peer = min(v for k, v in t.items() if k != "pallas")
        result = {
            "backend": backend,
            "ratio": peer / t["pallas"],
            **{f"{k}_tflops": flops / v / 1e12 for k, v in t.items()},
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
