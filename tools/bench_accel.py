"""Accelerator benchmark (not a test): our flash kernel vs the platform's own, and LoRA MFU.

GPU: forward+backward of `attention(impl="pallas")` (the Triton kernel) against
     `jax.nn.dot_product_attention(implementation="cudnn")`.
TPU: the same against JAX's splash attention kernel (`jax.experimental.pallas.ops.tpu`), one
     MQA kernel per kv head for GQA.
Both: B=4, T=4096, 32 query / 8 kv heads, D=128, bf16, causal; interleaved runs, best of N;
ratio = peer time / our time (> 1: ours is faster). Then the SmolLM2-135M LoRA train step
(`tools/bench_train.py`'s setup, attention "auto") on one device and its MFU
(`cmat_jax.training.mfu`, spec-sheet peak of the device). Last line: one JSON object.
On CPU it says that it needs an accelerator and exits 2.

    python tools/bench_accel.py [--reps 20] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ATTN_SHAPE = dict(B=4, T=4096, H=32, K=8, D=128)


def _cudnn_peer():
    import jax

    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"
    )


def _splash_peer(T: int, H: int, K: int, D: int, interpret: bool = False):
    """Splash attention for [B, T, H, D] q and [B, T, K, D] k/v: per kv head, an MQA kernel
    over its G query heads (splash takes unscaled logits, so q is scaled first)."""
    import jax
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    G = H // K
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(G)])
    kernel = sk.make_splash_mqa_single_device(mask=mask, interpret=interpret)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0))  # over K: q [G, T, D], k/v [T, D]
    per_row = jax.vmap(per_kv_head, in_axes=(0, 0, 0))  # over B

    def attend(q_BTHD, k_BTKD, v_BTKD):
        B = q_BTHD.shape[0]
        q_BKGTD = (q_BTHD * D**-0.5).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
        k_BKTD, v_BKTD = (x.transpose(0, 2, 1, 3) for x in (k_BTKD, v_BTKD))
        o_BKGTD = per_row(q_BKGTD, k_BKTD, v_BKTD)
        return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)

    return attend


def attention_part(backend: str, reps: int) -> dict:
    from bench_attention import _fwd_bwd, _inputs, _ours, best_times, causal_flops

    s = ATTN_SHAPE
    x = _inputs(s["B"], s["T"], s["H"], s["K"], s["D"])
    peer_name = "cudnn" if backend == "gpu" else "splash"
    peer = _cudnn_peer() if backend == "gpu" else _splash_peer(s["T"], s["H"], s["K"], s["D"])
    t = best_times({"pallas": _fwd_bwd(_ours("pallas")), peer_name: _fwd_bwd(peer)}, x, reps)
    flops = causal_flops(s["B"], s["T"], s["H"], s["D"])
    for name, sec in t.items():
        print(
            f"fwd+bwd {s} bf16 causal {name:8s} {sec * 1e3:8.2f} ms "
            f"{flops / sec / 1e12:7.1f} TFLOP/s",
            file=sys.stderr,
        )
    return {
        "peer": peer_name,
        "ratio": t[peer_name] / t["pallas"],
        "pallas_ms": t["pallas"] * 1e3,
        f"{peer_name}_ms": t[peer_name] * 1e3,
        "pallas_tflops": flops / t["pallas"] / 1e12,
        f"{peer_name}_tflops": flops / t[peer_name] / 1e12,
    }


def lora_step_part(steps: int) -> dict:
    import jax
    from bench_train import SMOLLM2_135M, run_ours

    from cmat_jax.model.config import ModelConfig
    from cmat_jax.training import mfu

    args = argparse.Namespace(
        attention="auto", remat="dots_saveable", batch=8, seq=2048, steps=steps, chunk_tokens=1024
    )
    res = run_ours(args)
    cfg = ModelConfig(**SMOLLM2_135M)
    per_token = mfu.training_flops_per_token(cfg, args.seq, lora_rank=16)
    peak, peak_name = mfu.peak_flops(jax.devices()[:1])
    return {
        "lora_135m_tok_s": res["tok_s"],
        "lora_135m_mfu": mfu.mfu(per_token, res["tok_s"], peak),
        "lora_135m_batch": f"{args.batch}x{args.seq}",
        "peak": peak_name,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    ns = p.parse_args(argv)
    import jax

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        print(
            f"tools/bench_accel.py: needs a GPU or TPU; JAX's backend here is {backend!r}",
            file=sys.stderr,
        )
        return 2
    result = {"backend": backend, "device_kind": jax.devices()[0].device_kind}
    result.update(attention_part(backend, ns.reps))
    result.update(lora_step_part(ns.steps))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
