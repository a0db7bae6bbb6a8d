"""Generation throughput: cmat_jax `Generator` vs transformers `generate`, both bf16, same process.

SmolLM2-135M-Instruct architecture (random init by default; `--real` loads the GGUF preset),
batch 16, prompt 256, 128 new tokens. Prints a JSON line last:
  ours_tok_s, peer_tok_s, ratio (= ours / peer), new tokens per second end to end (prefill
  included, compile excluded), plus ours' prefill time, decode steps/s and that as a fraction of
  the memory-bandwidth bound (weight + KV-cache bytes per step / measured copy bandwidth), and
  the dot floor: decode steps/s of a step that runs only its matmuls (`measure_dot_floor`) and
  `ratio_at_dot_floor`, the ratio our prefill plus a decode at that floor would reach (and
  `..._no_prefill`, the same with an instant prefill).

    python tools/bench_generate.py [--batch 16 --prompt 256 --new 128 --real --no-peer
                                    --attention chunked]

With `--turns K`: a multi-turn rollout instead. Every turn each prompt grows by what it
generated and `--obs` new tokens (an environment's answer); ours runs it with a `PrefixCache`
(only the new part of each prompt is prefilled) and without, the peer re-prefills as `generate`
does. ours_tok_s / peer_tok_s are new tokens over all turns per second; `reuse_speedup` is ours
with the prefix cache over ours without.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SMOLLM2_135M = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)


def measure_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of a large array copy (read + write counted), best of `repeats`."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def measure_dot_floor(model, batch: int, cache_len: int, steps: int = 32) -> float:
    """Decode steps/s of a step that runs only its matmuls, as XLA:CPU runs them in our decode
    (layers scanned over stacked uint16 weights): per layer the q/k/v/o and MLP weight dots and
    the two attention dots over the whole cache, then the LM head; no norms, RoPE, softmax,
    sampling or cache writes. The ceiling our decode can reach with these dot kernels."""
    from cmat_jax.model.llama import from_scan_bits, to_scan_bits

    cfg = model.config
    B, K, Dh, D = batch, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    G = cfg.num_heads // K
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    stacked = model.layers.stacked()
    layers = {n: to_scan_bits(stacked[n]) for n in names}
    cache_shape = (cfg.num_layers, B, K, cache_len, Dh)
    k_cache, v_cache = (to_scan_bits(jnp.ones(cache_shape, jnp.bfloat16)) for _ in range(2))
    head_VD = from_scan_bits(model.embed[...])
    bf16 = jnp.bfloat16

    def dot(x, w):
        return jnp.einsum("bd,dn->bn", x.astype(bf16), w, preferred_element_type=jnp.float32)

    def layer(x_BD, xs):
        p, kc, vc = jax.tree.map(from_scan_bits, xs)
        q_BKGD = dot(x_BD, p["wq"]).reshape(B, K, G, Dh).astype(bf16)
        kv = dot(x_BD, p["wk"]).sum() + dot(x_BD, p["wv"]).sum()
        s_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, kc, preferred_element_type=jnp.float32)
        o_BKGD = jnp.einsum(
            "bkgs,bksd->bkgd", s_BKGS.astype(bf16), vc, preferred_element_type=jnp.float32
        )
        x_BD = x_BD + dot(o_BKGD.reshape(B, -1), p["wo"]) + kv * 1e-9
        h_BD = x_BD.astype(bf16)
        return x_BD + dot(dot(h_BD, p["w_gate"]) * dot(h_BD, p["w_up"]), p["w_down"]), None

    def step(_, x_BD):
        x_BD, _ = jax.lax.scan(layer, x_BD, (layers, k_cache, v_cache))
        logits_BV = jnp.einsum(
            "bd,vd->bv", x_BD.astype(bf16), head_VD, preferred_element_type=jnp.float32
        )
        return x_BD + logits_BV[:, :D] * 1e-9

    run = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, x))
    x = jnp.full((B, D), 1e-3, jnp.float32)
    jax.block_until_ready(run(x))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(run(x))
        best = min(best, time.perf_counter() - t)
    return steps / best


def build_models(real: bool, with_peer: bool, attention_impl: str = "xla"):
    """(our model, HF model or None); the same weights on both sides. `attention_impl` is our
    model's full-sequence attention, which the prefill uses ("xla": scores over the cache)."""
    import torch
    import transformers

    from cmat_jax.model.config import ModelConfig
    from cmat_jax.weights.load import build_model

    if real:
        from cmat_jax import load_model
        from cmat_jax.weights.registry import smollm2_gguf_path

        ours, _ = load_model(
            "smollm2-135m-instruct", dtype="bfloat16", attention_impl=attention_impl
        )
        peer = None
        if with_peer:
            path = smollm2_gguf_path()
            peer = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.bfloat16
            ).eval()
        return ours, peer
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**SMOLLM2_135M)
    peer = transformers.LlamaForCausalLM(hf_cfg).eval().to(torch.bfloat16)
    cfg = ModelConfig.from_hf(
        {**SMOLLM2_135M, "architectures": ["LlamaForCausalLM"]},
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        attention_impl=attention_impl,
    )
    tensors = {k: v.float().numpy() for k, v in peer.state_dict().items()}
    ours = build_model(cfg, tensors, where="random init")
    return ours, (peer if with_peer else None)


def bench_ours(model, ids: np.ndarray, new: int, repeats: int) -> dict:
    from cmat_jax.inference.generate import Generator, compile_counts

    gen = Generator(model, cache_dtype="bfloat16")
    prompts = ids.tolist()
    t = time.perf_counter()
    gen.generate(prompts, max_new_tokens=new, eos_ids=[])
    first = time.perf_counter() - t
    # Prefill alone (max_new_tokens=1 shares the prefill program of a 1-token bucket).
    gen.generate(prompts, max_new_tokens=1, eos_ids=[])
    t = time.perf_counter()
    gen.generate(prompts, max_new_tokens=1, eos_ids=[])
    prefill_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = gen.generate(prompts, max_new_tokens=new, eos_ids=[])
        times.append(time.perf_counter() - t)
    assert all(n == new for n in out.lengths)
    best = min(times)
    return dict(
        total_s=best,
        first_call_s=first,
        prefill_s=prefill_s,
        decode_steps_s=(new - 1) / max(best - prefill_s, 1e-9),
        compiles=compile_counts(),
    )


def bench_peer(model, ids: np.ndarray, new: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    x = torch.tensor(ids)
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0)
    with torch.no_grad():
        model.generate(x[:, :16], **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(x, **kw)
            times.append(time.perf_counter() - t)
    assert out.shape[1] == ids.shape[1] + new
    return min(times)


def bench_turns(ours_model, peer_model, ids: np.ndarray, new: int, turns: int, obs: int) -> dict:
    """Seconds for `turns` turns of growing prompts: ours with and without a PrefixCache, and
    the peer. Each side runs the whole sequence twice and keeps the second (compiled) run; the
    prompts grow by our own outputs, so every side sees the same prompts."""
    from cmat_jax.inference.generate import Generator, PrefixCache

    gen = Generator(ours_model, cache_dtype="bfloat16")
    rng = np.random.default_rng(1)
    extra = rng.integers(3, ours_model.config.vocab_size, size=(turns, len(ids), obs)).tolist()

    def ours(prefix: bool) -> tuple[float, list[list[list[int]]], int]:
        prompts, seen, pc = ids.tolist(), [], PrefixCache() if prefix else None
        t = time.perf_counter()
        for k in range(turns):
            seen.append(prompts)
            out = gen.generate(prompts, max_new_tokens=new, eos_ids=[], prefix_cache=pc)
            prompts = [p + o + e for p, o, e in zip(prompts, out.tokens, extra[k], strict=True)]
        return time.perf_counter() - t, seen, 0 if pc is None else pc.reused_tokens

    ours(True), ours(False)  # compile every bucket the turns meet
    reuse_s, seen, reused = ours(True)
    plain_s, _, _ = ours(False)
    result = dict(
        ours_s=reuse_s,
        ours_plain_s=plain_s,
        reused_prompt_tokens=reused,
        prompt_tokens=sum(len(p) for turn in seen for p in turn),
        prompt_lengths=[max(len(p) for p in turn) for turn in seen],
    )
    if peer_model is not None:
        result["peer_s"] = sum(
            bench_peer(peer_model, np.array(turn), new, repeats=1) for turn in seen
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real", action="store_true", help="load the SmolLM2 GGUF preset")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--turns", type=int, default=0, help="a multi-turn rollout of this many turns")
    ap.add_argument("--obs", type=int, default=64, help="tokens each turn adds after the output")
    ap.add_argument(
        "--attention",
        default="xla",
        help="our prefill's attention impl (xla | chunked | auto ...; see cmat_jax.model.attention)",
    )
    args = ap.parse_args()

    ours_model, peer_model = build_models(args.real, not args.no_peer, args.attention)
    cfg = ours_model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(args.batch, args.prompt)).astype(np.int32)
    new_tokens = args.batch * args.new
    run = dict(
        device=str(jax.devices()[0]),
        batch=args.batch,
        prompt=args.prompt,
        new=args.new,
        real_weights=args.real,
    )
    if args.turns:
        r = bench_turns(ours_model, peer_model, ids, args.new, args.turns, args.obs)
        total = new_tokens * args.turns
        peer_tok_s = total / r["peer_s"] if "peer_s" in r else None
        ours_tok_s = total / r["ours_s"]
        result = dict(
            **run,
            turns=args.turns,
            obs=args.obs,
            ours_tok_s=round(ours_tok_s, 1),
            ours_plain_tok_s=round(total / r["ours_plain_s"], 1),
            peer_tok_s=None if peer_tok_s is None else round(peer_tok_s, 1),
            ratio=None if peer_tok_s is None else round(ours_tok_s / peer_tok_s, 2),
            reuse_speedup=round(r["ours_plain_s"] / r["ours_s"], 2),
            reused_prompt_tokens=r["reused_prompt_tokens"],
            prompt_tokens=r["prompt_tokens"],
            prompt_lengths=r["prompt_lengths"],
        )
        print(json.dumps(result))
        return

    ours = bench_ours(ours_model, ids, args.new, args.repeats)
    ours_tok_s = new_tokens / ours["total_s"]
    peer_tok_s = None
    if peer_model is not None:
        peer_tok_s = new_tokens / bench_peer(peer_model, ids, args.new, args.repeats)

    bw = measure_bandwidth()
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    weight_bytes = cfg.num_params() * itemsize
    S = args.prompt + args.new  # bucket sizes at the defaults (256 + 128) and at 1024 + 64
    cache_bytes = 2 * cfg.num_layers * args.batch * S * cfg.num_kv_heads * cfg.head_dim * 2
    bound_steps_s = bw / (weight_bytes + cache_bytes)
    floor_steps_s = measure_dot_floor(ours_model, args.batch, S)
    floor_tok_s = new_tokens / (ours["prefill_s"] + (args.new - 1) / floor_steps_s)
    result = dict(
        **run,
        attention=args.attention,
        ours_tok_s=round(ours_tok_s, 1),
        peer_tok_s=None if peer_tok_s is None else round(peer_tok_s, 1),
        ratio=None if peer_tok_s is None else round(ours_tok_s / peer_tok_s, 2),
        ours_total_s=round(ours["total_s"], 3),
        ours_first_call_s=round(ours["first_call_s"], 2),
        ours_prefill_s=round(ours["prefill_s"], 3),
        decode_steps_s=round(ours["decode_steps_s"], 2),
        bandwidth_gb_s=round(bw / 1e9, 2),
        bytes_per_step_mb=round((weight_bytes + cache_bytes) / 1e6, 1),
        bandwidth_bound_steps_s=round(bound_steps_s, 2),
        fraction_of_bandwidth_bound=round(ours["decode_steps_s"] / bound_steps_s, 3),
        dot_floor_steps_s=round(floor_steps_s, 2),
        fraction_of_dot_floor=round(ours["decode_steps_s"] / floor_steps_s, 3),
        ratio_at_dot_floor=None if peer_tok_s is None else round(floor_tok_s / peer_tok_s, 2),
        # ... and with an instant prefill: the most any change outside the dots could give.
        ratio_at_dot_floor_no_prefill=None
        if peer_tok_s is None
        else round(new_tokens * floor_steps_s / (args.new - 1) / peer_tok_s, 2),
        compiles=ours["compiles"],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
