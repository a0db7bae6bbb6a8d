"""Chunked cross-entropy: per-token log-probs of the targets without a [B, T, V] logits array.

The sequence is cut into chunks of C positions; a `lax.scan` computes each chunk's logits
[B, C, V] (matmul inputs in the compute dtype, f32 accumulation), its f32 logsumexp and the
target logit, and keeps only `logp [B, C]` and the f32 logsumexp. The backward pass (custom VJP)
recomputes one chunk's logits at a time; the head-weight gradient is accumulated in the same
loop and dropped by XLA when the head is frozen (LoRA).

Given `where_BT` (the positions whose log-probs are used, e.g. the loss mask), each row's used
positions are moved to its front before chunking and a chunk with none of them skips the LM head
(`lax.cond`) in both passes: an agent's rows train a few hundred reply tokens under a prompt of
~600, and the head ([V = 49152] x D for SmolLM2) is then computed where the loss needs it only.

With `temperature` τ != 1 every log-prob (and the entropy) is that of softmax(h @ w / τ), the
distribution a sampler at temperature τ draws from: PG/PPO score sampled tokens under the policy
that sampled them (docs/method.md §5). τ scales the f32 logits, not the bf16 inputs.

Batch layout shared by the SFT and CMAT steps: `inputs, targets, loss_mask [B, T]`, optional
`segment_ids, positions [B, T]` and `adapter_ids [B]` (int32, -1 = base model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

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
    where_BT: jax.Array | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """log softmax(h @ w / temperature)[target] per position, float32 [B, T]; with `where_BT`
    (bool [B, T]) only there, 0 elsewhere."""
    return _logp_pass(
        h_BTD, w_DV, targets_BT, compute_dtype, chunk_tokens, False, where_BT, temperature
    )[0]


def chunked_token_logp_entropy(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    compute_dtype: Any = jnp.bfloat16,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    where_BT: jax.Array | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(`chunked_token_logp`, the entropy of softmax(h @ w) per position), both f32 [B, T], from
    one pass over the LM head (with `where_BT`: both 0 outside it). The entropy is a metric: it
    carries no gradient (the backward pass ignores its cotangent)."""
    logp_BT, ent_BT = _logp_pass(
        h_BTD, w_DV, targets_BT, compute_dtype, chunk_tokens, True, where_BT, temperature
    )
    return logp_BT, jax.lax.stop_gradient(ent_BT)


def _logp_pass(
    h_BTD, w_DV, targets_BT, compute_dtype, chunk_tokens, with_entropy, where_BT, temperature
):
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    inv_t = 1.0 / float(temperature)
    B, T, _ = h_BTD.shape
    C = chunk_length(B, T, chunk_tokens)
    cdt = jnp.dtype(compute_dtype).name
    t_BT = jnp.clip(targets_BT.astype(jnp.int32), 0, w_DV.shape[1] - 1)
    if where_BT is None:
        live_BT = jnp.ones((B, T), bool)
        return _chunked_logp(C, cdt, with_entropy, False, inv_t, h_BTD, w_DV, t_BT, live_BT)
    # Used positions first in each row (stable: in order), so they fill the leading chunks and
    # the rest are skipped. Per row, not across the batch: a batch-sharded h stays local.
    where_BT = jnp.asarray(where_BT).astype(bool)
    order_BT = jnp.argsort(~where_BT, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order_BT.reshape(B, T, *(1,) * (x.ndim - 2)), axis=1)
    outs = _chunked_logp(
        C, cdt, with_entropy, True, inv_t, take(h_BTD), w_DV, take(t_BT), take(where_BT)
    )
    back_BT = jnp.argsort(order_BT, axis=1)
    return tuple(
        jnp.where(where_BT, jnp.take_along_axis(x, back_BT, axis=1), 0.0) if x.shape[1] else x
        for x in outs
    )


def _to_chunks(x_BT: jax.Array, C: int) -> jax.Array:
    """[B, T, ...] -> [n, B, C, ...] (zero-padded to n * C positions)."""
    B, T = x_BT.shape[:2]
    n = -(-T // C)
    if n * C != T:
        x_BT = jnp.pad(x_BT, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x_BT.ndim - 2))
    return jnp.moveaxis(x_BT.reshape(B, n, C, *x_BT.shape[2:]), 1, 0)


def _from_chunks(x_NBC: jax.Array, T: int) -> jax.Array:
    n, B, C = x_NBC.shape[:3]
    return jnp.moveaxis(x_NBC, 0, 1).reshape(B, n * C, *x_NBC.shape[3:])[:, :T]


def _chunk_logits(h_BCD: jax.Array, w_DV: jax.Array, inv_t: float) -> jax.Array:
    """f32 logits / τ of one chunk (`inv_t` = 1/τ; 1 adds no multiply)."""
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)
    return logits_BCV if inv_t == 1.0 else logits_BCV * inv_t


def _lse_entropy(logits_BCV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logsumexp, entropy) of each row of logits from one exp pass: with e = exp(l - max) and
    s = Σ e, lse = max + log s and H = lse - Σ e·l / s. Exp over [C, V] dominates this
    step's LM-head cost on CPU, so a second pass for the entropy alone is what this avoids."""
    m_BC = jax.lax.stop_gradient(jnp.max(logits_BCV, axis=-1))
    e_BCV = jnp.exp(logits_BCV - m_BC[..., None])
    s_BC = jnp.sum(e_BCV, axis=-1)
    lse_BC = m_BC + jnp.log(s_BC)
    return lse_BC, lse_BC - jnp.sum(e_BCV * logits_BCV, axis=-1) / s_BC


# A custom VJP so the backward pass (a) recomputes one chunk's logits at a time from the saved
# f32 logsumexp and (b) feeds the matmuls compute-dtype cotangents: autodiff would pair the f32
# cotangent with the bf16 weight, a mixed dot that runs at f32 speed on CPU (~2x slower).
# Outputs (logp [B, T], entropy [B, T], or [B, 0] without `with_entropy`). With `skip`, a chunk
# with no `live` position skips the head in both passes (its outputs and gradients are 0).
# `inv_t` = 1/τ is static: a config constant, one program per temperature.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _chunked_logp(
    C: int, cdt: str, with_entropy: bool, skip: bool, inv_t: float, h_BTD, w_DV, t_BT, live_BT
):
    return _chunked_logp_fwd(C, cdt, with_entropy, skip, inv_t, h_BTD, w_DV, t_BT, live_BT)[0]


def _if_live(skip: bool, live_BC: jax.Array, compute, dead_value):
    """compute(), or — with `skip` and no live position in the chunk — `dead_value` (zeros of
    compute's output structure) without running it."""
    if not skip:
        return compute()
    return jax.lax.cond(jnp.any(live_BC), compute, lambda: dead_value)


def _chunked_logp_fwd(C, cdt, with_entropy, skip, inv_t, h_BTD, w_DV, t_BT, live_BT):
    B, T = t_BT.shape
    w_c = w_DV.astype(cdt)  # one cast outside the loop (a no-op for a bf16 base)
    h_NBCD = _to_chunks(h_BTD.astype(cdt), C)
    t_NBC = _to_chunks(t_BT, C)
    live_NBC = _to_chunks(live_BT, C)
    zeros_BC = jnp.zeros(h_NBCD.shape[1:3], jnp.float32)
    ent_dead = zeros_BC if with_entropy else jnp.zeros((B, 0), jnp.float32)

    def chunk(_, xs):
        h_BCD, t_BC, live_BC = xs

        def compute():
            logits_BCV = _chunk_logits(h_BCD, w_c, inv_t)
            if with_entropy:
                lse_BC, ent_BC = _lse_entropy(logits_BCV)
            else:
                lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
                ent_BC = jnp.zeros((lse_BC.shape[0], 0), jnp.float32)
            tgt_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
            return tgt_BC - lse_BC, lse_BC, ent_BC

        return None, _if_live(skip, live_BC, compute, (zeros_BC, zeros_BC, ent_dead))

    _, (logp_NBC, lse_NBC, ent_NBC) = jax.lax.scan(chunk, None, (h_NBCD, t_NBC, live_NBC))
    res = (
        h_NBCD,
        w_c,
        t_NBC,
        live_NBC,
        lse_NBC,
        jnp.zeros((0,), h_BTD.dtype),
        jnp.zeros((0,), w_DV.dtype),
    )
    ent_BT = _from_chunks(ent_NBC, T) if with_entropy else jnp.zeros((B, 0), jnp.float32)
    return (_from_chunks(logp_NBC, T), ent_BT), res


def _chunked_logp_bwd(C, cdt, with_entropy, skip, inv_t, res, g):
    g_BT = g[0]  # the entropy's cotangent is dropped: it is a metric (see the public wrapper)
    h_NBCD, w_c, t_NBC, live_NBC, lse_NBC, h_tag, w_tag = res
    T = g_BT.shape[1]
    V = w_c.shape[1]
    g_NBC = _to_chunks(g_BT.astype(jnp.float32), C)

    def chunk(dw_DV, xs):
        h_BCD, t_BC, live_BC, lse_BC, g_BC = xs

        def compute():
            p_BCV = jnp.exp(_chunk_logits(h_BCD, w_c, inv_t) - lse_BC[..., None])
            onehot_BCV = t_BC[..., None] == jnp.arange(V, dtype=jnp.int32)
            # d logp[t] / d (h @ w) = (onehot(t) - softmax) / τ
            gt_BC = g_BC * inv_t
            dl_BCV = (gt_BC[..., None] * (onehot_BCV.astype(jnp.float32) - p_BCV)).astype(cdt)
            dh_BCD = jnp.einsum("bcv,dv->bcd", dl_BCV, w_c, preferred_element_type=jnp.float32)
            dw = jnp.einsum("bcd,bcv->dv", h_BCD, dl_BCV, preferred_element_type=jnp.float32)
            return dw_DV + dw, dh_BCD

        dead = (dw_DV, jnp.zeros(h_BCD.shape, jnp.float32))
        return _if_live(skip, live_BC, compute, dead)

    dw0 = jnp.zeros(w_c.shape, jnp.float32)
    dw_DV, dh_NBCD = jax.lax.scan(chunk, dw0, (h_NBCD, t_NBC, live_NBC, lse_NBC, g_NBC))
    dh_BTD = _from_chunks(dh_NBCD, T).astype(h_tag.dtype)
    return dh_BTD, dw_DV.astype(w_tag.dtype), None, None


_chunked_logp.defvjp(_chunked_logp_fwd, _chunked_logp_bwd)


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
    masked: bool = False,
    temperature: float = 1.0,
) -> jax.Array:
    """log p(targets | inputs) [B, T] f32 under each row's adapter at sampling temperature
    `temperature`; with `masked`, only where `batch["loss_mask"]` is set (0 elsewhere; the LM
    head skips what no loss reads).

    `model_or_parts`: a Llama, or `(graphdef, *states)` as given to `nnx.merge` (e.g.
    `(graphdef, lora_params, frozen)` with pure dicts). `adapter_ids_B` overrides
    `batch["adapter_ids"]` (pass `jnp.full((B,), -1)` for the reference model's logp).
    """
    return token_logp_entropy(
        _as_model(model_or_parts),
        batch,
        entropy=False,
        adapter_ids_B=adapter_ids_B,
        dropout_rng=dropout_rng,
        chunk_tokens=chunk_tokens,
        masked=masked,
        temperature=temperature,
    )[0]


def token_logp_entropy(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    entropy: bool,
    adapter_ids_B: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    masked: bool = False,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """(`token_logp` [B, T], the policy's entropy [B, T] (no gradient) or None without
    `entropy`), from one forward pass and one pass over the LM head; `masked` and
    `temperature` as in `token_logp`."""
    ids = batch.get("adapter_ids") if adapter_ids_B is None else adapter_ids_B
    h_BTD, _ = model.hidden(
        batch["inputs"],
        positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"),
        adapter_ids_B=ids,
        dropout_rng=dropout_rng,
    )
    kw = dict(
        compute_dtype=model.config.compute_dtype, chunk_tokens=chunk_tokens, temperature=temperature
    )
    if masked:
        kw["where_BT"] = jnp.asarray(batch["loss_mask"]) > 0
    w_DV = model.head_weight_DV()
    if entropy:
        return chunked_token_logp_entropy(h_BTD, w_DV, batch["targets"], **kw)
    return chunked_token_logp(h_BTD, w_DV, batch["targets"], **kw), None


# ----------------------------------------------------------------------------- pluggable losses

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "adapter_ids")


def finalize_metrics(
    sums: Mapping[str, jax.Array], denominators: Mapping[str, str] | None = None
) -> dict[str, jax.Array]:
    """Masked sums -> means: each sum over its own count — `denominators[name]` when the loss
    names one (`StepLoss.denominators`), else `tokens`; counts (`*_tokens`) stay counts."""
    denominators = denominators or {}
    out = {}
    for k, v in sums.items():
        if k == "tokens" or k.endswith("_tokens"):
            out[k] = v
        else:
            out[k] = v / jnp.maximum(sums.get(denominators.get(k, "tokens"), sums["tokens"]), 1.0)
    return out


class StepLoss:
    """The interface of every loss of the train step (`TokenCE`, `cmat_jax.cmat.loss.CMATLoss`):
    `sums(graphdef, params, frozen, batch, rng) -> (objective sum, metric sums incl. "tokens")`
    — additive over micro-batches, so gradient accumulation sums them and divides once by the
    tokens — plus `batch_keys` (fields the jitted step receives) and `validate(batch)` (a
    ValueError naming the field, before jit). Subclasses are frozen dataclasses (hashable: one
    compiled step per loss) that implement `model_sums` on the merged model. `denominators`
    names the count a metric is a mean over when it is not `tokens` (`finalize_metrics`)."""

    denominators: ClassVar[Mapping[str, str]] = {}

    def sums(
        self,
        graphdef: Any,
        params: Any,
        frozen: Any,
        batch: Mapping[str, jax.Array],
        rng: jax.Array | None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        model = nnx.merge(graphdef, params, frozen)
        dropout_rng = rng if model.lora.config.dropout > 0 else None
        return self.model_sums(model, batch, dropout_rng)

    def model_sums(
        self, model: nnx.Module, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def validate(self, batch: Mapping[str, Any]) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TokenCE(StepLoss):
    """The SFT loss: token-mean NLL of the targets over `loss_mask`."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    batch_keys: tuple[str, ...] = BATCH_KEYS

    def model_sums(
        self, model: nnx.Module, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp_BT = token_logp(
            model, batch, dropout_rng=dropout_rng, chunk_tokens=self.chunk_tokens, masked=True
        )
        nll, ntok = nll_sum(logp_BT, batch["loss_mask"])
        return nll, {"loss": jax.lax.stop_gradient(nll), "tokens": ntok}

    def validate(self, batch: Mapping[str, Any]) -> None:
        for k in ("inputs", "targets", "loss_mask"):
            if batch.get(k) is None:
                raise ValueError(f"SFT batch: missing field {k!r}")
