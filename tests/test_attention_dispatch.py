"""The attention dispatcher: every impl vs the reference, clear errors, fallback only in auto,
and the whole model with impl='pallas'/'chunked' matching 'xla' in logits and LoRA grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cmat_jax.model.attention import (
    AttentionInputError,
    UnsupportedAttentionError,
    attention,
    decode_attention,
)
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama
from cmat_jax.model.lora import LoRAConfig, LoRAParam

from .test_kernels_common import assert_close, make_inputs, out_and_grads, reference_out_and_grads


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas", "auto"])
def test_every_impl_matches_reference(impl):
    q, k, v, do, seg = make_inputs(2, 37, 6, 2, 64, jnp.float32, segments=True)
    fn = lambda q, k, v: attention(q, k, v, segment_ids_BT=seg, causal=True, impl=impl)
    got = jax.jit(lambda *a: out_and_grads(fn, *a))(q, k, v, do)
    assert_close(got, reference_out_and_grads(q, k, v, do, seg, True), jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "cudnn", "pallas", "chunked", "auto"])
def test_bad_inputs_raise_for_every_impl(impl):
    q, k, v, _, _ = make_inputs(1, 16, 6, 4, 64, jnp.float32, segments=False)
    with pytest.raises(AttentionInputError, match=r"query heads \(6\) must be a multiple"):
        attention(q, k, v, impl=impl)
    q, k, v, _, _ = make_inputs(1, 16, 4, 2, 64, jnp.float32, segments=False)
    with pytest.raises(AttentionInputError, match=r"segment_ids must have shape \[B, T\]"):
        attention(q, k, v, segment_ids_BT=jnp.zeros((1, 15), jnp.int32), impl=impl)
    with pytest.raises(AttentionInputError, match="head_dim of q"):
        attention(q, k[..., :32], v[..., :32], impl=impl)


def test_unknown_impl_raises():
    q, k, v, _, _ = make_inputs(1, 8, 2, 1, 64, jnp.float32, segments=False)
    with pytest.raises(AttentionInputError, match="impl must be one of"):
        attention(q, k, v, impl="flash")
    with pytest.raises(AttentionInputError, match="impl must be one of"):
        decode_attention(
            q[:, 0],
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            kv_start_B=jnp.zeros(1, int),
            kv_end_B=jnp.ones(1, int),
            impl="chunked",
        )


def test_model_config_names_the_attention_impls():
    """The config checks the field where it enters, against the dispatcher's own list."""
    from cmat_jax.model.attention import IMPLS
    from cmat_jax.model.config import ATTENTION_IMPLS, ConfigError

    assert ATTENTION_IMPLS == IMPLS
    with pytest.raises(ConfigError, match=r"attention_impl must be one of .* got 'flash'"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=8,
            attention_impl="flash",
        )


def test_explicit_impls_do_not_fall_back_but_auto_does():
    # head_dim 48: the Pallas kernels do not take it; chunked and xla do.
    q, k, v, do, _ = make_inputs(1, 20, 4, 2, 48, jnp.float32, segments=False)
    with pytest.raises(UnsupportedAttentionError, match="head_dim 48"):
        attention(q, k, v, impl="pallas")
    with pytest.raises(UnsupportedAttentionError, match="needs a GPU"):
        attention(q, k, v, impl="cudnn")
    want = reference_out_and_grads(q, k, v, do, None, True)
    got = out_and_grads(lambda *a: attention(*a, impl="auto"), q, k, v, do)
    assert_close(got, want, jnp.float32)
    # T != S: only xla takes cross-length attention; explicit chunked refuses, auto falls back.
    k2, v2 = k[:, :12], v[:, :12]
    with pytest.raises(UnsupportedAttentionError, match="needs T == S"):
        attention(q, k2, v2, causal=False, impl="chunked")
    o_auto = attention(q, k2, v2, causal=False, impl="auto")
    o_xla = attention(q, k2, v2, causal=False, impl="xla")
    np.testing.assert_allclose(np.asarray(o_auto), np.asarray(o_xla), atol=1e-6)


def test_decode_dispatch():
    q, k, v, _, _ = make_inputs(2, 40, 4, 2, 64, jnp.float32, segments=False)
    st, en = jnp.array([0, 10]), jnp.array([40, 30])
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # the KV-cache layout [B, K, S, D]
    outs = [
        decode_attention(q[:, 0], k, v, kv_start_B=st, kv_end_B=en, impl=impl)
        for impl in ("xla", "pallas", "auto")
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), atol=1e-5)


# ---------------------------------------------------------------- whole model

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=128,
    intermediate_size=192,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
)


def _logits_and_lora_grads(impl, ids, seg):
    model = Llama(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=4, targets=("q", "k", "v", "o")), rngs=nnx.Rngs(1))
    # B starts at zero (no gradient to A); give it values so every LoRA leaf is exercised.
    for name, b in model.lora.b.items():
        b[...] = 0.05 * jax.random.normal(jax.random.key(hash(name) % 1000), b[...].shape)
    graphdef, lora_state, frozen = nnx.split(model, LoRAParam, ...)
    w = jax.random.normal(jax.random.key(7), (*ids.shape, CFG.vocab_size))

    @jax.jit
    def run(lora_state):
        def loss(lora_state):
            m = nnx.merge(graphdef, lora_state, frozen)
            logits = m(ids, segment_ids_BT=seg, adapter_ids_B=jnp.zeros(ids.shape[0], jnp.int32))
            return jnp.sum(logits * w), logits

        return jax.grad(loss, has_aux=True)(lora_state)

    grads, logits = run(lora_state)
    return logits, jax.tree.leaves(grads)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_model_matches_xla_in_logits_and_lora_grads(impl):
    ids = jax.random.randint(jax.random.key(5), (2, 21), 0, CFG.vocab_size)
    seg = jnp.array([[1] * 12 + [2] * 9, [1] * 17 + [0] * 4], jnp.int32)
    logits_x, grads_x = _logits_and_lora_grads("xla", ids, seg)
    logits_i, grads_i = _logits_and_lora_grads(impl, ids, seg)
    np.testing.assert_allclose(np.asarray(logits_i), np.asarray(logits_x), atol=2e-4, rtol=2e-4)
    assert len(grads_i) == len(grads_x) == 8  # (A, B) for q, k, v, o; layers stacked
    for gi, gx in zip(grads_i, grads_x, strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(gx))))
        assert float(jnp.max(jnp.abs(gi - gx))) / scale < 2e-4
        assert float(jnp.max(jnp.abs(gx))) > 0
