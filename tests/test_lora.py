"""LoRA semantics in training: the `none` slot is the base model; gradients match a dense
reference that merges W + scale * A @ B by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama
from cmat_jax.model.lora import TARGETS, LoRAConfig, LoRAParam
from cmat_jax.training.losses import full_token_logp, nll_sum, token_logp

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


def _model_with_nonzero_lora(seed: int = 0) -> Llama:
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    model.add_lora(LORA, rngs=nnx.Rngs(seed + 1))
    # B starts at zero; give it values so the adapters actually change the output.
    key = jax.random.key(seed + 2)
    for t in model.lora.b:
        key, sub = jax.random.split(key)
        b = model.lora.b[t]
        b[...] = 0.1 * jax.random.normal(sub, b[...].shape, b[...].dtype)
    return model


def _batch(B: int = 4, T: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
        "loss_mask": rng.random((B, T)) < 0.8,
    }


def test_none_slot_reproduces_base_logits_exactly():
    model = _model_with_nonzero_lora()
    base = Llama(CFG, rngs=nnx.Rngs(0))  # same seed -> same base weights, no adapters
    ids = jnp.asarray(_batch()["inputs"])
    call = nnx.jit(lambda m, ids, a: m(ids, adapter_ids_B=a))
    want = nnx.jit(lambda m, ids: m(ids))(base, ids)
    got_none = call(model, ids, jnp.full((ids.shape[0],), -1, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got_none), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(nnx.jit(lambda m, i: m(i))(model, ids)), np.asarray(want)
    )
    # ...and a real slot differs, so the adapters are live.
    got_slot = call(model, ids, jnp.zeros((ids.shape[0],), jnp.int32))
    assert float(jnp.max(jnp.abs(got_slot - want))) > 1e-3


def _dense_reference_loss(lora_params, frozen, graphdef_base, batch, adapter_ids):
    """Per adapter group: merge W + scale*A@B by hand into a plain base model, full CE."""
    total = 0.0
    for slot in sorted(set(adapter_ids.tolist())):
        rows = np.flatnonzero(adapter_ids == slot)
        layers = dict(frozen["layers"])
        if slot >= 0:
            for t, (name, _, _) in TARGETS.items():
                a = lora_params["lora"]["a"][t][:, slot]
                b = lora_params["lora"]["b"][t][:, slot]
                layers[name] = layers[name] + LORA.scale * jnp.einsum("ldr,lrn->ldn", a, b)
        params = {k: v for k, v in frozen.items() if k != "lora"}
        params["layers"] = layers
        base = nnx.merge(graphdef_base, params)
        h, _ = base.hidden(jnp.asarray(batch["inputs"][rows]))
        logp = full_token_logp(h, base.head_weight_DV(), jnp.asarray(batch["targets"][rows]))
        total = total + nll_sum(logp, jnp.asarray(batch["loss_mask"][rows]))[0]
    return total


def test_lora_gradients_match_unfused_dense_reference():
    model = _model_with_nonzero_lora()
    graphdef, lora_state, frozen_state = nnx.split(model, LoRAParam, ...)
    lora_params, frozen = lora_state.to_pure_dict(), frozen_state.to_pure_dict()
    graphdef_base, _ = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    batch = _batch(B=5)
    adapter_ids = np.array([0, 1, -1, 0, 1], np.int32)

    def ours(p):
        b = {k: jnp.asarray(v) for k, v in batch.items()} | {"adapter_ids": adapter_ids}
        logp = token_logp((graphdef, p, frozen), b, chunk_tokens=16)
        return nll_sum(logp, b["loss_mask"])[0]

    def ref(p):
        return _dense_reference_loss(p, frozen, graphdef_base, batch, adapter_ids)

    v_ours, g_ours = jax.jit(jax.value_and_grad(ours))(lora_params)
    v_ref, g_ref = jax.jit(jax.value_and_grad(ref))(lora_params)
    np.testing.assert_allclose(float(v_ours), float(v_ref), rtol=1e-5)
    flat_ours = jax.tree_util.tree_leaves_with_path(g_ours)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_ref))
    for path, g in flat_ours:
        r = flat_ref[path]
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0, f"zero reference gradient at {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(
            np.asarray(g),
            np.asarray(r),
            rtol=2e-4,
            atol=2e-5 * scale,
            err_msg=jax.tree_util.keystr(path),
        )
