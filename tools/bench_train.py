"""LoRA training throughput: cmat_jax vs transformers + PEFT (torch), same shapes, same run.

SmolLM2-135M architecture (random init), LoRA r=16 on all seven projections, batch 8 x 512,
bf16 weights and matmuls. Each side runs in its own subprocess so its peak RSS is its own.
MFU counts model FLOPs as MaxText does for training: 6 x matmul params (incl. the LM head)
plus causal-halved attention (6 * T * H * Dh * L per token), over a bf16 x bf16 -> f32 matmul
peak measured here. Prints one JSON line last.

    python tools/bench_train.py [--steps 3] [--attention chunked] [--remat none]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    max_position_embeddings=8192,
)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def flops_per_token(c: dict, seq: int) -> float:
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_layers"], c["vocab_size"]
    q, kv = c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    matmul_params = L * (D * (q + 2 * kv) + q * D + 3 * D * F) + D * V
    attention = 6 * seq * q * L  # 12 * T * H * Dh * L, halved for causal
    return 6 * matmul_params + attention


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best bf16 x bf16 -> f32 matmul rate of this machine (GFLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _batch_np(B: int, T: int, V: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def run_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cmat_jax.model.config import ModelConfig
    from cmat_jax.model.llama import Llama
    from cmat_jax.model.lora import LoRAConfig
    from cmat_jax.training.step import (
        OptimConfig,
        init_train_state,
        make_optimizer,
        make_train_step,
    )

    cfg = ModelConfig(
        **SMOLLM2_135M,
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        attention_impl=args.attention,
        remat=args.remat,
    )
    model = Llama(cfg, rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=16, alpha=32.0, targets=TARGETS), rngs=nnx.Rngs(1))
    opt = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), total_steps=100)
    graphdef, frozen, state = init_train_state(model, opt, seed=0, base_dtype="bfloat16")
    del model
    step = make_train_step(graphdef, opt, chunk_tokens=args.chunk_tokens)
    B, T = args.batch, args.seq
    x, y = _batch_np(B, T, cfg.vocab_size)
    batch = {
        "inputs": jnp.asarray(x),
        "targets": jnp.asarray(y),
        "loss_mask": jnp.ones((B, T), bool),
        "adapter_ids": jnp.zeros((B,), jnp.int32),
    }
    t = time.perf_counter()
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    assert np.isfinite(float(m["loss"]))
    return {
        "tok_s": B * T / float(np.median(times)),
        "step_s": times,
        "first_step_s": compile_s,
        "loss": float(m["loss"]),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_peer(args) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = SMOLLM2_135M
    hf = LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_kv_heads"],
        head_dim=c["head_dim"],
        rope_theta=c["rope_theta"],
        rms_norm_eps=c["rms_norm_eps"],
        tie_word_embeddings=True,
        max_position_embeddings=c["max_position_embeddings"],
    )
    model = LlamaForCausalLM(hf).to(torch.bfloat16)
    lcfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=[f"{t}_proj" for t in TARGETS],
    )
    model = get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    B, T = args.batch, args.seq
    x, y = _batch_np(B, T, c["vocab_size"])
    x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()

    def step():
        out = model(input_ids=x)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return {
        "tok_s": B * T / float(np.median(times)),
        "step_s": times,
        "first_step_s": first,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_peak(args) -> dict:
    return {"peak_gflops": measure_peak_gflops()}


PARTS = {"ours": run_ours, "peer": run_peer, "peak": run_peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--attention", default="chunked")
    p.add_argument("--remat", default="dots_saveable")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return

    def sub(part: str) -> dict:
        cmd = [sys.executable, __file__, "--part", part, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            sys.exit(f"bench_train: part {part!r} failed ({why}):\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{part}: {json.dumps(res)}", file=sys.stderr)
        return res

    peak = sub("peak")["peak_gflops"]
    ours = sub("ours")
    peer = None if args.no_peer else sub("peer")
    fpt = flops_per_token(SMOLLM2_135M, args.seq)
    result = {
        "ours_tok_s": round(ours["tok_s"], 1),
        "peer_tok_s": None if peer is None else round(peer["tok_s"], 1),
        "ratio": None if peer is None else round(ours["tok_s"] / peer["tok_s"], 3),
        "mfu": round(fpt * ours["tok_s"] / (peak * 1e9), 3),
        "peak_gflops": round(peak, 1),
        "model_gflop_per_token": round(fpt / 1e9, 4),
        "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
        "peer_peak_rss_mb": None if peer is None else round(peer["peak_rss_mb"]),
        "batch": args.batch,
        "seq": args.seq,
        "attention": args.attention,
        "remat": args.remat,
        "cpu_load_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
