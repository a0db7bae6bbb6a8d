"""Generation through the attention kernels: with attention_impl="pallas" the `Generator`'s
prefill runs the flash kernel and every decode step the Pallas decode kernel (interpreted on
CPU); tokens equal the XLA path's and log-probs match, for a plain call and for a second turn
that reuses cached prefixes (the extend path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmat_jax.inference.generate import Generator, PrefixCache, SamplingParams
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import KVCache, Llama

CFG = ModelConfig(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    max_position_embeddings=256,
)


def test_decode_step_runs_the_decode_kernel():
    model = Llama(CFG.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
    cache = KVCache.init(CFG, 2, 32, jnp.float32)._replace(index=jnp.int32(5))
    step = lambda ids, cache: model.hidden(ids, cache=cache)
    names = str(jax.make_jaxpr(step)(jnp.zeros((2, 1), jnp.int32), cache))
    assert "flash_decode" in names
    xla = Llama(CFG, rngs=nnx.Rngs(0))
    assert "flash_decode" not in str(
        jax.make_jaxpr(lambda ids, c: xla.hidden(ids, cache=c))(jnp.zeros((2, 1), jnp.int32), cache)
    )


def test_pallas_generation_matches_xla():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (3, 9, 14, 6)]
    kw = dict(
        max_new_tokens=12, eos_ids=[], sampling=SamplingParams(1.0, 20, 0.9), key=jax.random.key(3)
    )
    outs = {}
    for impl in ("xla", "pallas"):
        gen = Generator(
            Llama(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0)), cache_dtype="float32"
        )
        pc = PrefixCache()
        first = gen.generate(prompts, prefix_cache=pc, **kw)
        turn2 = [p + t + [7, 8, 9] for p, t in zip(prompts, first.tokens, strict=True)]
        second = gen.generate(turn2, prefix_cache=pc, **kw)
        assert pc.reused_tokens > 0
        outs[impl] = (first, second)
    for got, want in zip(outs["pallas"], outs["xla"], strict=True):
        assert got.tokens == want.tokens
        np.testing.assert_allclose(
            np.concatenate(got.logprobs), np.concatenate(want.logprobs), atol=1e-4
        )
