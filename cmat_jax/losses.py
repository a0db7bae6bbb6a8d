"""Chunked cross-entropy: per-token log-probs of the targets without a [B, T, V] logits array.

The sequence is cut into chunks of C positions; a `lax.scan` computes each chunk's logits
[B, C, V] (matmul inputs in the compute dtype, f32 accumulation), its f32 logsumexp and the
target logit, and keeps only `logp [B, C]`. The chunk body is rematerialized, so the backward
pass recomputes one chunk's logits at a time instead of storing all of them. When the head
weight is frozen (LoRA) autodiff never forms its gradient.

Batch layout shared by the SFT and CMAT steps: `inputs, targets, loss_mask [B, T]`, optional
`segment_ids, positions [B, T]` and `adapter_ids [B]` (int32, -1 = base model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_CHUNK_TOKENS = 1024


def chunk_length(batch: int, seq: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Positions per chunk so that one chunk holds about `chunk_tokens` tokens."""
    return max(1, min(seq, chunk_tokens // max(batch, 1)))


def chunked_token_logp(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    compute_dtype: Any = jnp.bfloat16,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> jax.Array:
    """log softmax(h @ w)[target] per position, float32 [B, T]."""
    B, T, D = h_BTD.shape
    V = w_DV.shape[1]
    C = chunk_length(B, T, chunk_tokens)
    n = -(-T // C)
    pad = n * C - T
    cdt = jnp.dtype(compute_dtype)
    # One cast of the head outside the loop (a no-op for a bf16 base).
    w_DV = w_DV.astype(cdt)
    h_BTD = h_BTD.astype(cdt)
    t_BT = jnp.clip(targets_BT.astype(jnp.int32), 0, V - 1)
    if pad:
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        t_BT = jnp.pad(t_BT, ((0, 0), (0, pad)))
    h_NBCD = h_BTD.reshape(B, n, C, D).transpose(1, 0, 2, 3)
    t_NBC = t_BT.reshape(B, n, C).transpose(1, 0, 2)

    @jax.checkpoint
    def chunk(_, xs):
        h_BCD, t_BC = xs
        logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        tgt_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        return None, tgt_BC - lse_BC

    _, logp_NBC = jax.lax.scan(chunk, None, (h_NBCD, t_NBC))
    return logp_NBC.transpose(1, 0, 2).reshape(B, n * C)[:, :T]


def full_token_logp(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Unchunked f32 reference (materializes [B, T, V]); for tests and tiny models only."""
    logits = jnp.einsum("btd,dv->btv", h_BTD.astype(jnp.float32), w_DV.astype(jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def nll_sum(logp_BT: jax.Array, loss_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token NLL, number of masked tokens), both float32 scalars."""
    m = loss_mask_BT.astype(jnp.float32)
    return -jnp.sum(logp_BT * m), jnp.sum(m)


def _as_model(model_or_parts: Any) -> nnx.Module:
    if isinstance(model_or_parts, tuple):
        return nnx.merge(*model_or_parts)
    return model_or_parts


def token_logp(
    model_or_parts: Any,
    batch: Mapping[str, jax.Array],
    *,
    adapter_ids_B: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> jax.Array:
    """log p(targets | inputs) [B, T] f32 under each row's adapter.

    `model_or_parts`: a Llama, or `(graphdef, *states)` as given to `nnx.merge` (e.g.
    `(graphdef, lora_params, frozen)` with pure dicts). `adapter_ids_B` overrides
    `batch["adapter_ids"]` (pass `jnp.full((B,), -1)` for the reference model's logp).
    """
    model = _as_model(model_or_parts)
    ids = batch.get("adapter_ids") if adapter_ids_B is None else adapter_ids_B
    h_BTD, _ = model.hidden(
        batch["inputs"],
        positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"),
        adapter_ids_B=ids,
        dropout_rng=dropout_rng,
    )
    return chunked_token_logp(
        h_BTD,
        model.head_weight_DV(),
        batch["targets"],
        compute_dtype=model.config.compute_dtype,
        chunk_tokens=chunk_tokens,
    )
