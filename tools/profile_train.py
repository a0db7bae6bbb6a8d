"""Time the pieces of one LoRA train step (SmolLM2-135M shapes) to see where the time goes.

Each piece is jitted on its own and timed (best of --repeats after a compile call):
the whole step, the forward loss only, the decoder forward+backward without the LM head, the
chunked CE forward+backward, and one layer's attention forward+backward per attention impl
(times x num_layers).

    python tools/profile_train.py [--repeats 2] [--attention chunked]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_train import SMOLLM2_135M, TARGETS


def best_time(f, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--attention", default="chunked")
    p.add_argument("--remat", default="none")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--only", default="", help="comma list of pieces to time")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import cmat_jax.model.llama as llama
    from cmat_jax.model.attention import attention
    from cmat_jax.model.config import ModelConfig
    from cmat_jax.model.lora import LoRAConfig
    from cmat_jax.training.losses import chunked_token_logp, nll_sum, token_logp
    from cmat_jax.training.step import (
        OptimConfig,
        init_train_state,
        make_optimizer,
        make_train_step,
    )

    cfg = ModelConfig(
        **SMOLLM2_135M,
        param_dtype=args.dtype,
        compute_dtype=args.dtype,
        attention_impl=args.attention,
        remat=args.remat,
    )
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=16, alpha=32.0, targets=TARGETS), rngs=nnx.Rngs(1))
    opt = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), total_steps=100)
    graphdef, frozen, state = init_train_state(model, opt, seed=0, base_dtype=args.dtype)
    B, T, D, L = args.batch, args.seq, cfg.hidden_size, cfg.num_layers
    key = jax.random.key(0)
    ids = jax.random.randint(key, (B, T), 0, cfg.vocab_size)
    batch = {
        "inputs": ids,
        "targets": jnp.roll(ids, -1, axis=1),
        "loss_mask": jnp.ones((B, T), bool),
        "adapter_ids": jnp.zeros((B,), jnp.int32),
    }
    only = set(filter(None, args.only.split(",")))
    out: dict[str, float] = {}

    def piece(name: str, f, *a) -> None:
        if only and name not in only:
            return
        out[name] = round(best_time(f, *a, repeats=args.repeats), 3)
        print(f"{name}: {out[name]} s", file=sys.stderr)

    def loss(params, frozen, batch):
        logp = token_logp((graphdef, params, frozen), batch)
        return nll_sum(logp, batch["loss_mask"])[0]

    piece("forward_loss", jax.jit(loss), state.params, frozen, batch)
    piece("loss_and_grad", jax.jit(jax.grad(loss)), state.params, frozen, batch)

    def decoder_only(params, frozen, batch):
        m = nnx.merge(graphdef, params, frozen)
        h, _ = m.hidden(batch["inputs"], adapter_ids_B=batch["adapter_ids"])
        return jnp.sum(h * h)

    piece("decoder_fwd_bwd", jax.jit(jax.grad(decoder_only)), state.params, frozen, batch)

    h = jax.random.normal(key, (B, T, D), jnp.float32)
    w = frozen["embed"].T

    def ce(h):
        return nll_sum(chunked_token_logp(h, w, batch["targets"]), batch["loss_mask"])[0]

    piece("ce_fwd_bwd", jax.jit(jax.grad(ce)), h)

    q = jax.random.normal(key, (B, T, cfg.num_heads, cfg.head_dim), args.dtype)
    kv = jax.random.normal(key, (B, T, cfg.num_kv_heads, cfg.head_dim), args.dtype)
    for impl in ("xla", "chunked"):

        def attn(q, k, v, impl=impl):
            o = attention(q, k, v, causal=True, impl=impl)
            return jnp.sum(o.astype(jnp.float32) ** 2)

        f = jax.jit(jax.grad(attn, (0, 1, 2)))
        if not only or f"attention_{impl}_x{L}" in only:
            t = best_time(f, q, kv, kv, repeats=args.repeats)
            out[f"attention_{impl}_x{L}"] = round(t * L, 3)
            print(f"attention {impl} x{L}: {t * L:.3f} s", file=sys.stderr)

    step = make_train_step(graphdef, opt, donate=False)
    if not only or "train_step" in only:
        jax.block_until_ready(step(state, frozen, batch))  # compile and run once, untimed
        t = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(step(state, frozen, batch))
        out["train_step"] = round((time.perf_counter() - t) / args.repeats, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
