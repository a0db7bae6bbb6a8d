"""The CMAT loss and step against plain references of the docs/method.md §5 formulas.

References run the tiny model's full logits ([B, T, V], unchunked): values are computed in
numpy (float64 after the logits), gradients by jax.grad of a plain-jnp transcription of the
same formulas, and a few LoRA entries by central finite differences of the numpy reference.
The loss under test uses the chunked head (3 chunks, the last one padded).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cmat_jax.cmat.loss import (
    LOSSES,
    CMATLoss,
    LossConfig,
    cmat_loss,
    policy_logp,
    reference_logp,
    validate_batch,
)
from cmat_jax.data.rows import batch_from_tokens
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama
from cmat_jax.model.lora import LoRAConfig, LoRAParam
from cmat_jax.sharding import make_mesh
from cmat_jax.training.step import init_train_state, make_train_step

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
B, T = 4, 12
CHUNK = 20  # -> 5 positions per chunk for B=4: 3 chunks, the last padded by 3
ADAPTERS = np.array([0, 1, -1, 0], np.int32)  # assistant, checker, none, assistant
EPS = 0.2
MODES = ("rwr", "pg", "ppo")
DIRTY = ("advantage", "behavior_logp", "ref_logp")  # garbage at masked-out positions


def _model(seed: int = 0) -> Llama:
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    model.add_lora(LORA, rngs=nnx.Rngs(seed + 1))
    key = jax.random.key(seed + 2)
    for t in model.lora.b:  # B starts at zero; make the adapters live
        key, sub = jax.random.split(key)
        b = model.lora.b[t]
        b[...] = 0.1 * jax.random.normal(sub, b[...].shape, b[...].dtype)
    return model


@functools.cache
def _parts():
    graphdef, lora, frozen = nnx.split(_model(), LoRAParam, ...)
    return graphdef, lora.to_pure_dict(), frozen.to_pure_dict()


@functools.cache
def _jit_logits():
    graphdef, _, _ = _parts()

    @jax.jit
    def logits(params, frozen, inputs, ids):
        return nnx.merge(graphdef, params, frozen)(inputs, adapter_ids_B=ids)

    return logits


def _batch(seed: int = 0, adapters: np.ndarray = ADAPTERS) -> dict[str, np.ndarray]:
    """A batch with garbage (inf / NaN) at masked-out positions of every per-token input."""
    graphdef, params, frozen = _parts()
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7
    mask[:, 0] = True
    batch = {
        "inputs": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
        "loss_mask": mask,
        "adapter_ids": adapters.astype(np.int32),
        "advantage": rng.normal(size=(B, T)).astype(np.float32),
        "weight": rng.uniform(0.2, 2.0, B).astype(np.float32),
        "anchor": np.array([True, False, False, True]),
    }
    logp = np.asarray(policy_logp(graphdef, params, frozen, batch, chunk_tokens=CHUNK))
    batch["behavior_logp"] = (logp + rng.uniform(-0.4, 0.4, (B, T))).astype(np.float32)
    batch["ref_logp"] = np.asarray(
        reference_logp(graphdef, params, frozen, batch, chunk_tokens=CHUNK)
    )
    for k, bad in zip(DIRTY, (np.nan, -np.inf, np.inf), strict=True):
        batch[k] = np.where(mask, batch[k], bad).astype(np.float32)
    return batch


def _cfg(mode: str) -> LossConfig:
    return LossConfig(mode=mode, clip_eps=EPS, kl_coef=0.3, anchor_coef=0.5)


# ----------------------------------------------------------------------------- references


def _numpy_reference(logits_BTV: np.ndarray, batch: dict, cfg: LossConfig) -> dict[str, float]:
    """The docs/method.md formulas in float64 numpy over the masked tokens only."""
    z = np.asarray(logits_BTV, np.float64)
    logz = z - z.max(-1, keepdims=True)
    logz = logz - np.log(np.exp(logz).sum(-1, keepdims=True))
    m = batch["loss_mask"]
    logp = np.take_along_axis(logz, batch["targets"][..., None], -1)[..., 0][m]
    ent = -(np.exp(logz) * logz).sum(-1)[m]
    A = batch["advantage"][m]
    w = np.broadcast_to(batch["weight"][:, None], (B, T))[m]
    anchor = np.broadcast_to(batch["anchor"][:, None], (B, T))[m].astype(np.float64)
    rho = np.exp(logp - batch["behavior_logp"][m])
    if cfg.mode == "rwr":
        pol = -w * logp
    elif cfg.mode == "pg":
        pol = -A * logp
    else:
        pol = -np.minimum(rho * A, np.clip(rho, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)
    d = batch["ref_logp"][m] - logp
    kl = np.exp(d) - d - 1
    per_tok = pol + cfg.kl_coef * kl + cfg.anchor_coef * anchor * (-logp)
    sampled = anchor == 0  # anchor rows were never sampled: no ratio
    ratio = {} if cfg.mode == "rwr" else {
        "ratio": rho[sampled].mean(),
        "clip_frac": (np.abs(rho[sampled] - 1) > cfg.clip_eps).mean(),
        "sampled_tokens": float(sampled.sum()),
    }  # fmt: skip
    return {
        "loss": per_tok.mean(),
        "policy_loss": pol.mean(),
        "kl": kl.mean(),
        **ratio,
        "entropy": ent.mean(),
        "nll": -logp.mean(),
        "weighted_nll": -(w * logp).mean(),
        "anchor_nll": -(anchor * logp).sum() / anchor.sum(),
        "tokens": float(m.sum()),
        "anchor_tokens": anchor.sum(),
    }


def _dense_jnp_loss(params, frozen, batch, cfg: LossConfig):
    """Plain-jnp transcription of the formulas on full logits (for jax.grad); `batch` holds
    zeros instead of garbage at masked-out positions (see `_dense_grad`)."""
    graphdef, _, _ = _parts()
    model = nnx.merge(graphdef, params, frozen)
    logits = model(batch["inputs"], adapter_ids_B=batch["adapter_ids"]) / cfg.temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    A, beh, ref = batch["advantage"], batch["behavior_logp"], batch["ref_logp"]
    if cfg.mode == "rwr":
        pol = -batch["weight"][:, None] * logp
    elif cfg.mode == "pg":
        pol = -A * logp
    else:
        rho = jnp.exp(logp - beh)
        pol = -jnp.minimum(rho * A, jnp.clip(rho, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)
    kl = jnp.exp(ref - logp) - (ref - logp) - 1
    anc = batch["anchor"][:, None] * (-logp)
    per_tok = pol + cfg.kl_coef * kl + cfg.anchor_coef * anc
    return jnp.sum(jnp.where(m, per_tok, 0.0)) / m.sum()


_dense_grad_jit = jax.jit(
    lambda p, f, b: {m: jax.grad(_dense_jnp_loss)(p, f, b, _cfg(m)) for m in MODES}
)


def _dense_grad(params, frozen, batch, cfg):
    m = batch["loss_mask"]
    clean = {k: np.where(m, v, 0.0) if k in DIRTY else v for k, v in batch.items()}
    assert cfg == _cfg(cfg.mode)
    return _dense_grad_jit(params, frozen, _device(clean))[cfg.mode]


@functools.cache
def _loss_and_grad():
    """jit of value_and_grad(cmat_loss) for all three modes at once: one compile, not three."""
    graphdef, _, _ = _parts()

    def loss(params, frozen, batch, cfg):
        return cmat_loss(params, frozen, batch, cfg, graphdef=graphdef, chunk_tokens=CHUNK)

    vg = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(lambda p, f, b: {m: vg(p, f, b, _cfg(m)) for m in MODES})


def _grad(params, frozen, batch, cfg):
    """((loss, metrics), grads) of the loss under test."""
    assert cfg == _cfg(cfg.mode)
    return _loss_and_grad()(params, frozen, _device(batch))[cfg.mode]


def _device(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _assert_trees_close(got, want, rtol, atol):
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------- loss tests


@pytest.mark.parametrize("mode", MODES)
def test_loss_value_metrics_and_grads_match_references(mode):
    _, params, frozen = _parts()
    batch = _batch()
    cfg = _cfg(mode)
    (loss, metrics), grads = _grad(params, frozen, batch, cfg)

    logits = _jit_logits()(params, frozen, batch["inputs"], batch["adapter_ids"])
    want = _numpy_reference(np.asarray(logits), batch, cfg)
    assert set(metrics) == set(want)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5, atol=1e-6)
    for k, v in want.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    # Clipping happens (and not everywhere), and the adapters are far enough from the base.
    assert 0.1 < _numpy_reference(np.asarray(logits), batch, _cfg("ppo"))["clip_frac"] < 0.9
    assert want["kl"] > 1e-4

    want_grads = _dense_grad(params, frozen, batch, cfg)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    assert scale > 1e-3
    _assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("mode", ["rwr", "ppo"])
def test_grads_match_finite_differences(mode):
    """Central differences of the numpy reference loss on three LoRA entries."""
    _, params, frozen = _parts()
    batch = _batch(seed=1)
    cfg = _cfg(mode)
    _, grads = _grad(params, frozen, batch, cfg)

    def ref_loss(p):
        logits = _jit_logits()(p, frozen, batch["inputs"], batch["adapter_ids"])
        return _numpy_reference(np.asarray(logits), batch, cfg)["loss"]

    h = 3e-3
    for side, target, slot in (("a", "q", 0), ("b", "down", 1), ("b", "v", 0)):
        g = np.asarray(grads["lora"][side][target])
        idx = np.unravel_index(np.argmax(np.abs(g[:, slot])), g[:, slot].shape)
        idx = (idx[0], slot, *idx[1:])
        x = np.asarray(params["lora"][side][target])
        vals = []
        for sign in (1, -1):
            xp = x.copy()
            xp[idx] += sign * h
            p = jax.tree.map(lambda v: v, params)
            p["lora"][side][target] = jnp.asarray(xp)
            vals.append(ref_loss(p))
        fd = (vals[0] - vals[1]) / (2 * h)
        np.testing.assert_allclose(g[idx], fd, rtol=2e-2, err_msg=f"{side}[{target}]{idx}")


def test_ppo_at_ratio_one_equals_pg():
    graphdef, params, frozen = _parts()
    batch = _batch()
    batch["behavior_logp"] = np.asarray(
        policy_logp(graphdef, params, frozen, batch, chunk_tokens=CHUNK)
    )
    (ppo_loss, ppo_m), ppo_g = _grad(params, frozen, batch, _cfg("ppo"))
    (_, pg_m), pg_g = _grad(params, frozen, batch, _cfg("pg"))
    assert float(ppo_m["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(ppo_m["clip_frac"]) == 0.0
    _assert_trees_close(ppo_g, pg_g, rtol=1e-5, atol=1e-8)
    # The values differ by design: ppo's surrogate at ρ=1 is −A, pg's is −A·logp.
    m = batch["loss_mask"]
    np.testing.assert_allclose(float(ppo_m["policy_loss"]), -batch["advantage"][m].mean(), 1e-5)
    extra = float(ppo_loss) - float(ppo_m["policy_loss"])
    np.testing.assert_allclose(extra, float(pg_m["loss"]) - float(pg_m["policy_loss"]), 1e-5)


def test_tempered_loss_matches_references_at_its_temperature():
    """LossConfig.temperature τ: every log-prob of the loss is log_softmax(logits / τ). Value,
    metrics and gradient equal the references on logits / τ; behaviour log-probs scored at τ
    give ρ = 1 (the sampler records them at its τ: tests/test_cmat_rollout.py)."""
    graphdef, params, frozen = _parts()
    tau = 0.6
    cfg = dataclasses.replace(_cfg("ppo"), temperature=tau)
    batch = _batch(seed=2)
    m = batch["loss_mask"]
    on_policy = np.asarray(
        policy_logp(graphdef, params, frozen, batch, chunk_tokens=CHUNK, temperature=tau)
    )
    batch["ref_logp"] = np.asarray(
        reference_logp(graphdef, params, frozen, batch, chunk_tokens=CHUNK, temperature=tau)
    )
    logits = np.asarray(_jit_logits()(params, frozen, batch["inputs"], batch["adapter_ids"]))
    loss_fn = jax.jit(
        jax.value_and_grad(
            lambda p, f, b: cmat_loss(p, f, b, cfg, graphdef=graphdef, chunk_tokens=CHUNK),
            has_aux=True,
        )
    )
    dense_grad = jax.jit(jax.grad(lambda p, f, b: _dense_jnp_loss(p, f, b, cfg)))
    for beh in (on_policy, on_policy + np.random.default_rng(0).uniform(-0.4, 0.4, (B, T))):
        batch["behavior_logp"] = np.where(m, beh, -np.inf).astype(np.float32)
        (_, metrics), grads = loss_fn(params, frozen, _device(batch))
        want = _numpy_reference(logits / tau, batch, cfg)
        assert set(metrics) == set(want)
        for k, v in want.items():
            np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
        clean = {k: np.where(m, v, 0.0) if k in DIRTY else v for k, v in batch.items()}
        want_grads = dense_grad(params, frozen, _device(clean))
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
        _assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6 * scale)
    assert float(
        _numpy_reference(logits / tau, {**batch, "behavior_logp": on_policy}, cfg)["ratio"]
    ) == pytest.approx(1.0, abs=1e-5)
    # The temperature matters: at τ = 1 the same tokens score differently.
    assert (
        np.abs(
            on_policy[m]
            - np.asarray(policy_logp(graphdef, params, frozen, batch, chunk_tokens=CHUNK))[m]
        ).max()
        > 0.1
    )


def test_kl_is_zero_and_no_gradient_on_the_none_slot():
    _, params, frozen = _parts()
    batch = _batch(adapters=np.full(B, -1, np.int32))
    # ref_logp is the base model's log-prob: compare with a LoRA-free model's full logits.
    base = Llama(CFG, rngs=nnx.Rngs(0))
    logits = np.asarray(base(jnp.asarray(batch["inputs"])), np.float64)
    logz = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logz, batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    np.testing.assert_allclose(batch["ref_logp"][m], want[m], rtol=1e-5, atol=1e-5)

    (_, metrics), grads = _grad(params, frozen, batch, _cfg("pg"))
    assert float(metrics["kl"]) == 0.0
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_mixed_adapter_rows_get_gradients_only_in_their_own_slot():
    _, params, frozen = _parts()
    batch = _batch()
    cfg = _cfg("ppo")
    (_, full_m), full_g = _grad(params, frozen, batch, cfg)
    summed = jax.tree.map(jnp.zeros_like, full_g)
    for slot in (0, 1, -1):
        rows = slot == ADAPTERS
        part = dict(batch, loss_mask=batch["loss_mask"] & rows[:, None])
        (_, m), g = _grad(params, frozen, part, cfg)
        for side in ("a", "b"):
            for t, arr in g["lora"][side].items():
                arr = np.asarray(arr)
                for s in (0, 1):
                    if s == slot:
                        assert np.abs(arr[:, s]).max() > 0, (side, t, s)
                    else:
                        assert not np.any(arr[:, s]), (side, t, s, slot)
        w = float(m["tokens"]) / float(full_m["tokens"])
        summed = jax.tree.map(lambda acc, x, w=w: acc + w * x, summed, g)
    _assert_trees_close(summed, full_g, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- step tests

LR = 0.05
OPT = optax.sgd(LR)  # plain SGD: the step's update is exactly -LR * grad


def _state():
    """(graphdef, frozen, TrainState) of a fresh copy of the model, base kept in float32."""
    return init_train_state(_model(), OPT, seed=0, base_dtype=None)


@functools.cache
def _step():
    """One compiled ppo step shared by the step tests (fresh states each time)."""
    graphdef, _, _ = _state()
    return make_train_step(graphdef, OPT, loss=CMATLoss(_cfg("ppo"), chunk_tokens=CHUNK))


def test_cmat_step_is_an_sgd_step_on_the_reference_grads_and_touches_only_lora():
    graphdef, frozen, state = _state()
    frozen_before = jax.tree.map(np.array, frozen)
    params_before = jax.tree.map(np.array, state.params)
    batch = _batch(adapters=np.array([0, 0, -1, 0], np.int32))  # no checker rows
    new_state, metrics = _step()(state, frozen, batch)

    cfg = _cfg("ppo")
    want_grads = _dense_grad(params_before, frozen_before, batch, cfg)
    want = jax.tree.map(lambda p, g: p - LR * g, params_before, want_grads)
    _assert_trees_close(new_state.params, want, rtol=1e-5, atol=1e-7)
    for side in ("a", "b"):
        for t in params_before["lora"][side]:
            new = np.asarray(new_state.params["lora"][side][t])
            old = params_before["lora"][side][t]
            np.testing.assert_array_equal(new[:, 1], old[:, 1])  # checker slot untouched
            assert np.abs(new[:, 0] - old[:, 0]).max() > 0
    # The merged model's base weights are the originals; only LoRAParam leaves differ.
    merged = nnx.merge(graphdef, new_state.params, frozen)
    _, _, frozen_after = nnx.split(merged, LoRAParam, ...)
    _assert_trees_close(frozen_after.to_pure_dict(), frozen_before, rtol=0, atol=0)
    assert int(new_state.step) == 1 and int(metrics["skipped"]) == 0
    logits = _jit_logits()(params_before, frozen_before, batch["inputs"], batch["adapter_ids"])
    want_m = _numpy_reference(np.asarray(logits), batch, cfg)
    np.testing.assert_allclose(float(metrics["loss"]), want_m["loss"], rtol=1e-5)
    assert {"grad_norm", "lr", "kl", "entropy", "clip_frac"} <= set(metrics)


def test_cmat_step_skips_non_finite_loss():
    _, frozen, state = _state()
    params_before = jax.tree.map(np.array, state.params)
    batch = _batch()
    batch["advantage"] = batch["advantage"].copy()
    batch["advantage"][0, 0] = np.nan  # a masked-in token
    new_state, metrics = _step()(state, frozen, batch)
    assert int(metrics["skipped"]) == 1 and int(new_state.skipped) == 1
    assert int(new_state.step) == 1
    _assert_trees_close(new_state.params, params_before, rtol=0, atol=0)


def test_cmat_step_on_a_mesh_with_accumulation_equals_the_plain_step():
    batch = _batch()
    _, frozen, state = _state()
    plain, m1 = _step()(state, frozen, batch)
    graphdef, frozen, state = _state()
    loss = CMATLoss(_cfg("ppo"), chunk_tokens=CHUNK)
    step = make_train_step(graphdef, OPT, make_mesh(), accum_steps=2, loss=loss)
    sharded, m2 = step(state, frozen, batch)
    _assert_trees_close(sharded.params, plain.params, rtol=1e-5, atol=1e-7)
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- boundaries


def test_registry_and_config_validation():
    assert set(LOSSES) == {"rwr", "pg", "ppo"}
    with pytest.raises(ValueError, match=r"LossConfig\.mode"):
        LossConfig(mode="dpo")
    with pytest.raises(ValueError, match=r"LossConfig\.clip_eps"):
        LossConfig(clip_eps=0.0)
    with pytest.raises(ValueError, match=r"LossConfig\.kl_coef"):
        LossConfig(kl_coef=-1.0)


def test_validate_batch_names_the_bad_field():
    rng = np.random.default_rng(0)
    good = {
        "inputs": np.zeros((2, 5), np.int32),
        "targets": np.zeros((2, 5), np.int32),
        "loss_mask": np.ones((2, 5), bool),
        "adapter_ids": np.zeros(2, np.int32),
        "advantage": rng.normal(size=(2, 5)),
        "ref_logp": np.zeros((2, 5)),
    }
    validate_batch(good, LossConfig(mode="pg"))
    with pytest.raises(ValueError, match=r"'behavior_logp'.*ppo"):
        validate_batch(good, LossConfig(mode="ppo"))
    with pytest.raises(ValueError, match="'weight'"):
        validate_batch(good, LossConfig(mode="rwr"))
    with pytest.raises(ValueError, match="'anchor'"):
        validate_batch(good, LossConfig(mode="pg", anchor_coef=1.0))
    with pytest.raises(ValueError, match="'advantage' has shape"):
        validate_batch(dict(good, advantage=np.zeros((2, 4))), LossConfig(mode="pg"))
    with pytest.raises(ValueError, match="'adapter_ids' has shape"):
        validate_batch(dict(good, adapter_ids=np.zeros(3, np.int32)), LossConfig(mode="pg"))
    with pytest.raises(ValueError, match="'weight' has shape"):
        validate_batch(dict(good, weight=np.ones(5)), LossConfig(mode="rwr"))
    validate_batch(dict(good, weight=np.ones((2, 5))), LossConfig(mode="rwr"))


def test_batch_from_tokens_shifts_per_token_fields():
    tokens = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    gen = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], bool)
    adv = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = batch_from_tokens(tokens, gen, np.array([0, 1]), advantage=adv, weight=np.ones(2))
    np.testing.assert_array_equal(b["inputs"], [[5, 6, 7], [1, 2, 3]])
    np.testing.assert_array_equal(b["targets"], [[6, 7, 8], [2, 3, 4]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(b["advantage"], [[1, 2, 3], [5, 6, 7]])
    np.testing.assert_array_equal(b["weight"], [1, 1])
    assert b["adapter_ids"].dtype == np.int32
    validate_batch(b, LossConfig(mode="pg", kl_coef=0.0))


def test_packed_rows_score_as_if_each_were_alone():
    from cmat_jax.data.rows import TrainRow, pack_rows, packed_batch, rows_to_batch

    graphdef, params, frozen = _parts()
    rng = np.random.default_rng(3)

    def row(n, adapter, anchor=False):
        m = (rng.random(n) < 0.6).astype(np.float32)
        m[0] = 0.0
        w = m * rng.uniform(0.5, 2.0)
        toks = rng.integers(0, CFG.vocab_size, n).astype(np.int32)
        return TrainRow(toks, m, m * 0.3, w, m * 0, adapter, "assistant", -1, 1.0, anchor=anchor)

    rows = [row(5, 0), row(9, 1), row(7, 0, anchor=True), row(4, 0), row(13, 1), row(6, 0)]
    packs = pack_rows(rows, seq_len=12)
    # First fit, one adapter per sequence: [5, 7] tokens = 4 + 6 positions, then the 4-token row
    # (3 positions) no longer fits; the 13-token row fills a sequence alone.
    assert [[len(r.tokens) for r in p] for p in packs] == [[5, 7], [9], [4, 6], [13]]
    assert all(len({r.adapter_id for r in p}) == 1 for p in packs)
    packed = packed_batch([*packs, []], 12)
    assert packed["segment_ids"][0].tolist() == [1] * 4 + [2] * 6 + [0] * 2
    assert packed["positions"][0, 4:10].tolist() == list(range(6))
    assert not packed["loss_mask"][-1].any() and packed["anchor"][0, 4:10].all()
    logp_packed = np.asarray(policy_logp(graphdef, params, frozen, packed, chunk_tokens=CHUNK))
    alone = rows_to_batch(rows, seq_len=12)
    logp_alone = np.asarray(policy_logp(graphdef, params, frozen, alone, chunk_tokens=CHUNK))
    order = [0, 2, 1, 3, 5, 4]  # rows in packing order
    got = np.concatenate([logp_packed[b, : (packed["segment_ids"][b] > 0).sum()] for b in range(4)])
    want = np.concatenate([logp_alone[i, : len(rows[i].tokens) - 1] for i in order])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The same CMAT loss: one token mean over the same masked tokens.
    cfg = LossConfig(mode="rwr", kl_coef=0.0, anchor_coef=0.5, entropy=False)
    loss_fn = functools.partial(cmat_loss, cfg=cfg, graphdef=graphdef, chunk_tokens=CHUNK)
    lp, _ = loss_fn(params, frozen, {k: jnp.asarray(v) for k, v in packed.items()})
    la, _ = loss_fn(params, frozen, {k: jnp.asarray(v) for k, v in alone.items()})
    np.testing.assert_allclose(float(lp), float(la), rtol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows([row(14, 0)], seq_len=12)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_shared_prefix_rows_score_as_if_each_were_alone(impl):
    """Rows opening with one prompt are packed together and the prompt is laid out once per
    sequence (segment SHARED_SEGMENT, seen by every row after it): each trained token's log-prob,
    the CMAT loss and its gradient are those of the rows laid out alone."""
    from cmat_jax_kernels.common import SHARED_SEGMENT

    from cmat_jax.data.rows import (
        MIN_SHARED_PREFIX,
        TrainRow,
        pack_rows,
        packed_batch,
        prefix_groups,
        rows_to_batch,
    )

    model = _model()
    model.config = dataclasses.replace(CFG, attention_impl=impl)
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    params, frozen = lora.to_pure_dict(), frozen.to_pure_dict()
    rng = np.random.default_rng(5)
    P = MIN_SHARED_PREFIX + 8
    prompts = {0: rng.integers(0, CFG.vocab_size, P), 1: rng.integers(0, CFG.vocab_size, P)}

    def row(adapter, n_own, anchor=False):
        own = rng.integers(0, CFG.vocab_size, n_own)
        toks = np.concatenate([prompts[adapter], own]).astype(np.int32)
        m = np.zeros(len(toks), np.float32)
        m[P + 2 :] = rng.random(n_own - 2) < 0.7  # the row's own prompt tail, then its reply
        w = m * rng.uniform(0.5, 2.0)
        return TrainRow(toks, m, m * 0.3, w, m * 0, adapter, "assistant", -1, 1.0, anchor=anchor)

    lone = TrainRow(*(np.arange(20, dtype=np.int32) % CFG.vocab_size, *[np.ones(20, np.float32)] * 4),
                    adapter_id=0, role="assistant", episode=-1, reward=1.0)  # fmt: skip
    rows = [row(0, 9), row(1, 12), row(0, 6, anchor=True), lone, row(0, 14), row(1, 7)]
    groups = prefix_groups(rows)
    assert sorted((sorted(g), n) for g, n in groups) == [([0, 2, 4], P), ([1, 5], P)]
    seq_len = P + 30
    packs = pack_rows(rows, seq_len, share_prefixes=True)
    packed = packed_batch([*packs, []], seq_len, share_prefixes=True)
    # Without sharing, [0, 2] would not fit one sequence: 2P + 13 positions.
    assert [[len(r.tokens) - P for r in p] for p in packs] == [[9, 6, 14], [12, 7], [20 - P]]
    seg = packed["segment_ids"]
    assert (seg[0, :P] == SHARED_SEGMENT).all() and (seg[1, :P] == SHARED_SEGMENT).all()
    assert seg[0, P:].tolist() == [1] * 8 + [2] * 5 + [3] * 13 + [0] * 4
    assert packed["positions"][0, P + 8 : P + 13].tolist() == list(range(P, P + 5))
    assert not (seg[2] == SHARED_SEGMENT).any()  # a lone row shares nothing
    logp_packed = np.asarray(policy_logp(graphdef, params, frozen, packed, chunk_tokens=CHUNK))
    alone = rows_to_batch(rows, seq_len=seq_len)
    logp_alone = np.asarray(policy_logp(graphdef, params, frozen, alone, chunk_tokens=CHUNK))
    m_packed, m_alone = packed["loss_mask"] > 0, alone["loss_mask"] > 0
    assert m_packed.sum() == m_alone.sum()
    order = [0, 2, 4, 1, 5, 3]  # rows in packing order
    got = logp_packed[m_packed]
    want = np.concatenate([logp_alone[i][m_alone[i]] for i in order])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    cfg = LossConfig(mode="rwr", kl_coef=0.0, anchor_coef=0.5, entropy=False)
    loss_fn = functools.partial(cmat_loss, cfg=cfg, graphdef=graphdef, chunk_tokens=CHUNK)
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, frozen, b)[0])
    lp, gp = grad_fn(params, {k: jnp.asarray(v) for k, v in packed.items()})
    la, ga = grad_fn(params, {k: jnp.asarray(v) for k, v in alone.items()})
    np.testing.assert_allclose(float(lp), float(la), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ga), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
