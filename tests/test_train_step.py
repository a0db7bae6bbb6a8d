"""The LoRA train step: chunked CE, frozen base, non-finite skip, grad accumulation, schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama
from cmat_jax.model.lora import LoRAConfig
from cmat_jax.training.losses import (
    chunked_token_logp,
    chunked_token_logp_entropy,
    full_token_logp,
    nll_sum,
)
from cmat_jax.training.step import (
    OptimConfig,
    TrainState,
    init_train_state,
    make_optimizer,
    make_schedule,
    make_train_step,
)

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
LORA = LoRAConfig(rank=4, alpha=8.0, slots=("assistant", "checker"))
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, clip_norm=1.0, weight_decay=0.01)


@pytest.fixture(scope="module")
def model() -> Llama:
    m = Llama(CFG, rngs=nnx.Rngs(0))
    m.add_lora(LORA, rngs=nnx.Rngs(1))
    return m


def _batch(B: int = 8, T: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2 :] = 2  # two packed conversations per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0)
    return {
        "inputs": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
        "loss_mask": rng.random((B, T)) < 0.7,
        "segment_ids": seg,
        "positions": pos.astype(np.int32),
        "adapter_ids": (np.arange(B) % 3 - 1).astype(np.int32),
    }


def test_chunked_ce_matches_full_logits():
    T, chunk_tokens = 13, 8  # chunk of 4 positions: 4 chunks, the last one padded
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    B, D, V = 2, 16, 40
    h = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V)) * 0.5
    tgt = jax.random.randint(k3, (B, T), 0, V)
    mask = (jnp.arange(T) % 3 != 0)[None].repeat(B, 0)

    def loss(fn, h, w):
        return nll_sum(fn(h, w, tgt), mask)[0]

    chunked = lambda h, w, t: chunked_token_logp(
        h, w, t, compute_dtype=jnp.float32, chunk_tokens=chunk_tokens
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(chunked)(h, w, tgt)),
        np.asarray(full_token_logp(h, w, tgt)),
        rtol=1e-5,
        atol=1e-5,
    )
    v_c, (gh_c, gw_c) = jax.jit(jax.value_and_grad(lambda h, w: loss(chunked, h, w), (0, 1)))(h, w)
    v_f, (gh_f, gw_f) = jax.value_and_grad(lambda h, w: loss(full_token_logp, h, w), (0, 1))(h, w)
    np.testing.assert_allclose(float(v_c), float(v_f), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gh_c), np.asarray(gh_f), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw_c), np.asarray(gw_f), rtol=1e-4, atol=1e-5)


def test_chunked_logp_entropy_one_pass():
    """The fused pass gives the same log-probs and gradients as `chunked_token_logp`, and the
    entropy of the full softmax (numpy, float64) with no gradient through it."""
    B, T, D, V, chunk_tokens = 2, 13, 16, 40, 8
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k1, (B, T, D)) * 2.0
    w = jax.random.normal(k2, (D, V))
    tgt = jax.random.randint(k3, (B, T), 0, V)
    kw = dict(compute_dtype=jnp.float32, chunk_tokens=chunk_tokens)
    logp, ent = jax.jit(lambda h, w: chunked_token_logp_entropy(h, w, tgt, **kw))(h, w)
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ent), -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(logp), np.asarray(chunked_token_logp(h, w, tgt, **kw)), rtol=1e-6, atol=1e-6
    )

    def loss(h, w, fused):
        if fused:
            lp, e = chunked_token_logp_entropy(h, w, tgt, **kw)
            return -jnp.sum(lp) + 0.0 * jnp.sum(e)
        return -jnp.sum(chunked_token_logp(h, w, tgt, **kw))

    g_fused = jax.grad(loss, (0, 1))(h, w, True)
    g_plain = jax.grad(loss, (0, 1))(h, w, False)
    for a, b in zip(g_fused, g_plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    ent_sum = lambda h: jnp.sum(chunked_token_logp_entropy(h, w, tgt, **kw)[1])
    assert not np.any(np.asarray(jax.grad(ent_sum)(h)))


def test_chunked_logp_only_where_used():
    """With `where_BT` the pass returns the unmasked log-probs and entropies there and 0
    elsewhere, with the same gradients of any masked objective; a row with no used position and
    used positions spread across chunks included. The skipping is a `cond` in the program."""
    B, T, D, V, chunk_tokens = 3, 21, 16, 40, 12  # 4 positions per chunk, the last one padded
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k1, (B, T, D)) * 2.0
    w = jax.random.normal(k2, (D, V))
    tgt = jax.random.randint(k3, (B, T), 0, V)
    where = np.zeros((B, T), bool)
    where[0, [3, 9, 10, 20]] = True  # scattered: compacted into the first chunk
    where[2, 5:] = True  # most of a row: several chunks live
    kw = dict(compute_dtype=jnp.float32, chunk_tokens=chunk_tokens)
    full_lp, full_ent = chunked_token_logp_entropy(h, w, tgt, **kw)
    lp, ent = jax.jit(lambda h, w: chunked_token_logp_entropy(h, w, tgt, where_BT=where, **kw))(
        h, w
    )
    for got, want in ((lp, full_lp), (ent, full_ent)):
        np.testing.assert_allclose(
            np.asarray(got), np.where(where, np.asarray(want), 0.0), rtol=1e-6, atol=1e-6
        )
    weights = jax.random.uniform(jax.random.key(3), (B, T)) * where

    def objective(h, w, masked):
        lp = chunked_token_logp(h, w, tgt, where_BT=where if masked else None, **kw)
        return -jnp.sum(weights * lp)

    g_masked = jax.jit(jax.grad(objective, (0, 1)), static_argnums=2)(h, w, True)
    g_full = jax.grad(objective, (0, 1))(h, w, False)
    for a, b in zip(g_masked, g_full, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(g_masked[0])[~where])
    jaxpr = str(jax.make_jaxpr(jax.grad(objective, (0, 1)), static_argnums=2)(h, w, True))
    assert jaxpr.count("cond[") >= 2  # forward and backward chunk loops
    assert "cond[" not in str(jax.make_jaxpr(objective, static_argnums=2)(h, w, False))


def test_schedule_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    s = make_schedule(cfg, 20)
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4)], [0.0, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(float(s(20)), 0.1, rtol=1e-5)
    assert float(s(10)) < 1.0 and float(s(10)) > 0.1


def test_steps_train_lora_only_and_skip_non_finite(model):
    opt = make_optimizer(OPTIM, total_steps=10)
    graphdef, frozen, state = init_train_state(model, opt, seed=0, base_dtype="float32")
    frozen_before = jax.tree.map(np.asarray, frozen)
    params_before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(graphdef, opt)
    batch = _batch()

    losses = []
    for _ in range(3):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        assert int(metrics["skipped"]) == 0
        assert float(metrics["tokens"]) == float(batch["loss_mask"].sum())
    assert losses[-1] < losses[0]  # it learns
    assert float(metrics["lr"]) > 0 and np.isfinite(float(metrics["grad_norm"]))
    assert int(state.step) == 3 and int(state.skipped) == 0
    # Base untouched (same values, never part of the optimized tree); LoRA moved.
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, frozen))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), params_before, state.params
    )
    assert all(jax.tree.leaves(changed))
    assert set(state.params) == {"lora"}

    # A NaN in the base poisons loss and grads: the update is skipped and counted.
    bad = jax.tree.map(lambda x: x, frozen)
    bad["layers"]["wq"] = bad["layers"]["wq"].at[0, 0, 0].set(jnp.nan)
    kept = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = step(state, bad, batch)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 4 and int(state.skipped) == 1
    jax.tree.map(
        np.testing.assert_array_equal,
        kept,
        jax.tree.map(np.asarray, (state.params, state.opt_state)),
    )
    # Training resumes normally afterwards.
    state, metrics = step(state, frozen, batch)
    assert int(metrics["skipped"]) == 0 and float(metrics["loss"]) < losses[0]


def test_grad_accumulation_equals_big_batch(model):
    opt = make_optimizer(OPTIM, total_steps=10)
    graphdef, frozen, state0 = init_train_state(model, opt, seed=0, base_dtype="float32")
    batch = _batch(B=8, seed=1)
    copy = lambda s: jax.tree.map(jnp.array, s)
    results = {}
    for accum in (1, 4):
        step = make_train_step(graphdef, opt, accum_steps=accum)
        state: TrainState = copy(state0)
        losses = []
        for _ in range(2):
            state, metrics = step(state, frozen, batch)
            losses.append(float(metrics["loss"]))
        results[accum] = (losses, state.params, float(metrics["tokens"]))
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-5)
    assert results[4][2] == results[1][2]
    jax.tree.map(
        lambda a, b: (  # Adam divides by sqrt(v): near-zero grads amplify summation-order noise to ~lr*1e-3.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
        ),
        results[4][1],
        results[1][1],
    )
    with pytest.raises(ValueError, match="accum_steps=3"):
        make_train_step(graphdef, opt, accum_steps=3)(copy(state0), frozen, batch)


def test_optim_config_errors():
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="accum_steps"):
        OptimConfig(accum_steps=0)
