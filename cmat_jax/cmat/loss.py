"""The CMAT loss and the CMAT step (docs/method.md §5): pure functions of (LoRA params, frozen
base, batch).

The whole objective is one token mean over the loss mask `m` (the tokens a role generated):

    L = Σ m · [ policy_term + κ · k3(ref_logp, logp) + λ · anchor · (−logp) ] / Σ m

with `policy_term` from the registry `LOSSES` (docs/method.md formulas, `logp = log π_θ(target)` under
the row's adapter):

    rwr  −w · logp                                 (w: RWR weight of the episode)
    pg   −A · logp                                 (A: group-relative advantage)
    ppo  −min(ρA, clip(ρ, 1−ε, 1+ε)A),  ρ = exp(logp − behavior_logp)

and the k3 KL estimator `exp(ref − logp) − (ref − logp) − 1` against the adapter "none" (the
frozen base). The SFT anchor `λ · NLL` covers anchor rows (expert / successful trajectories) and
is divided by all masked tokens like every other term, so the loss stays one token mean and
gradient accumulation over micro-batches is exact (λ's effect scales with the anchor share).

Batch (all per-token arrays [B, T] are aligned with `targets`: position t scores predicting
`targets[t]` after `inputs[:t+1]`; `cmat_jax.data.rows` builds it from rollout rows):
  inputs, targets       int32 [B, T]   (targets = inputs shifted left by one)
  loss_mask             bool/float [B, T]
  adapter_ids           int32 [B]      (the row's LoRA slot; -1 = "none", the base model)
  segment_ids, positions  optional int32 [B, T] (packed rows)
  advantage             f32 [B, T]     (pg, ppo)
  behavior_logp         f32 [B, T]     (ppo; also gives the ratio / clip-fraction metrics)
  ref_logp              f32 [B, T]     (when kl_coef > 0; `reference_logp` computes it)
  weight                f32 [B] or [B, T]   (rwr)
  anchor                bool [B] or [B, T]  (when anchor_coef > 0)
Values at masked-out positions are ignored (they may be padding garbage, even inf).

Per-token log-probs and the entropy metric (no gradient) come from one chunked pass over the LM
head (`cmat_jax.training.losses.chunked_token_logp_entropy`, custom VJP), so no [B, T, V]
float32 logits array is ever formed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmat_jax.model.lora import NONE_SLOT
from cmat_jax.training.losses import (
    DEFAULT_CHUNK_TOKENS,
    StepLoss,
    finalize_metrics,
    token_logp,
    token_logp_entropy,
)

MODES = ("rwr", "pg", "ppo")
MODEL_KEYS = ("inputs", "targets", "segment_ids", "positions")
PER_TOKEN_KEYS = ("loss_mask", "advantage", "behavior_logp", "ref_logp", "segment_ids", "positions")
PER_ROW_OR_TOKEN_KEYS = ("weight", "anchor")
BATCH_KEYS = ("inputs", "targets", "adapter_ids", *PER_TOKEN_KEYS, *PER_ROW_OR_TOKEN_KEYS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """mode: rwr | pg | ppo. clip_eps: ε of the PPO clip (also the clip-fraction threshold
    |ρ−1| > ε in every mode). kl_coef: κ on the k3 KL to the "none" slot. anchor_coef: λ on the
    NLL of anchor rows. entropy: compute the policy-entropy metric (a sum over the vocabulary
    in the LM-head pass the log-probs already make). temperature: every log-prob of the loss
    (policy, reference, anchor) is under softmax(logits / temperature); PG/PPO set it to the
    rollouts' sampling temperature, so `logp` is the log-prob of the policy that sampled the
    tokens and, on-policy, ρ = 1 up to the sampler's numerics (it records `behavior_logp` at
    that temperature: `inference.generate`). The RWR temperature τ is not here: the weights
    `w_i = softmax_g(R_i/τ)·G` arrive precomputed (`feedback.rwr_weights` with CMATConfig.tau)."""

    mode: str = "rwr"
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    anchor_coef: float = 0.0
    entropy: bool = True
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LossConfig.mode must be one of {'|'.join(MODES)}, got {self.mode!r}")
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"LossConfig.clip_eps must be in (0, 1), got {self.clip_eps!r}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"LossConfig.temperature must be a finite number > 0, got {self.temperature!r}"
            )
        for name in ("kl_coef", "anchor_coef"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"LossConfig.{name} must be a finite number >= 0, got {value!r}")

    def required_keys(self) -> tuple[str, ...]:
        keys = ["inputs", "targets", "loss_mask", "adapter_ids"]
        keys += {"rwr": ["weight"], "pg": ["advantage"], "ppo": ["advantage", "behavior_logp"]}[
            self.mode
        ]
        if self.kl_coef > 0:
            keys.append("ref_logp")
        if self.anchor_coef > 0:
            keys.append("anchor")
        return tuple(keys)


# ----------------------------------------------------------------------------- the objective

TokenObjective = Callable[[jax.Array, Mapping[str, jax.Array], LossConfig], jax.Array]


def rwr_objective(logp_BT: jax.Array, b: Mapping[str, jax.Array], cfg: LossConfig) -> jax.Array:
    """Reward-weighted regression: −w · logp."""
    return -b["weight"] * logp_BT


def pg_objective(logp_BT: jax.Array, b: Mapping[str, jax.Array], cfg: LossConfig) -> jax.Array:
    """REINFORCE with the group baseline (folded into A): −A · logp."""
    return -b["advantage"] * logp_BT


def ppo_objective(logp_BT: jax.Array, b: Mapping[str, jax.Array], cfg: LossConfig) -> jax.Array:
    """Clipped surrogate: −min(ρA, clip(ρ, 1−ε, 1+ε)A) with ρ = exp(logp − behavior_logp)."""
    ratio = jnp.exp(logp_BT - b["behavior_logp"])
    adv = b["advantage"]
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    return -jnp.minimum(ratio * adv, clipped * adv)


LOSSES: dict[str, TokenObjective] = {"rwr": rwr_objective, "pg": pg_objective, "ppo": ppo_objective}


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) on samples from π_θ; >= 0, 0 iff equal."""
    d = ref_logp_BT - logp_BT
    return jnp.exp(d) - d - 1.0


def cmat_token_loss(logp_BT: jax.Array, b: Mapping[str, jax.Array], cfg: LossConfig) -> jax.Array:
    """The CMAT objective per token (before masking): policy term + κ·KL + λ·anchor NLL."""
    loss = LOSSES[cfg.mode](logp_BT, b, cfg)
    if cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * k3_kl(logp_BT, b["ref_logp"])
    if cfg.anchor_coef > 0:
        loss = loss + cfg.anchor_coef * b["anchor"] * (-logp_BT)
    return loss


# ----------------------------------------------------------------------------- log-probs


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_tokens", "use_none", "temperature"))
def _logp_jit(
    graphdef, params, frozen, batch, *, chunk_tokens: int, use_none: bool, temperature: float
):
    model = nnx.merge(graphdef, params, frozen)
    B = batch["inputs"].shape[0]
    ids = jnp.full((B,), NONE_SLOT, jnp.int32) if use_none else batch["adapter_ids"]
    return token_logp(
        model,
        batch,
        adapter_ids_B=ids,
        chunk_tokens=chunk_tokens,
        masked="loss_mask" in batch,
        temperature=temperature,
    )


def _model_batch(batch: Mapping[str, Any], *extra: str) -> dict[str, jax.Array]:
    keys = (*MODEL_KEYS, *extra)
    return {k: jnp.asarray(batch[k]) for k in keys if batch.get(k) is not None}


def reference_logp(
    graphdef: Any,
    params: Any,
    frozen: Any,
    batch: Mapping[str, Any],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> jax.Array:
    """`ref_logp [B, T]` f32: log-probs of the targets under the adapter "none" (the frozen
    base) at `temperature` (the loss's) — a jitted no-grad forward, run once per round; only
    where `loss_mask` is set when the batch has one (0 elsewhere: the loss reads no other).
    `params` are the LoRA params (any value: slot "none" ignores them; they only complete the
    graph)."""
    return _logp_jit(
        graphdef,
        params,
        frozen,
        _model_batch(batch, "loss_mask"),
        chunk_tokens=chunk_tokens,
        use_none=True,
        temperature=temperature,
    )


def policy_logp(
    graphdef: Any,
    params: Any,
    frozen: Any,
    batch: Mapping[str, Any],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> jax.Array:
    """log-probs [B, T] under each row's adapter (`batch["adapter_ids"]`), no grad: the
    teacher-forced `behavior_logp` for PPO when the sampler's own log-probs are not exact;
    masked and at `temperature` like `reference_logp`."""
    return _logp_jit(
        graphdef,
        params,
        frozen,
        _model_batch(batch, "adapter_ids", "loss_mask"),
        chunk_tokens=chunk_tokens,
        use_none=False,
        temperature=temperature,
    )


# ----------------------------------------------------------------------------- the loss


def _per_token(x: jax.Array, like_BT: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x[:, None] * jnp.ones_like(like_BT) if x.ndim == 1 else x


def _cmat_model_sums(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    cfg: LossConfig,
    dropout_rng: jax.Array | None,
    chunk_tokens: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(Σ m·objective, masked sums of every metric incl. "tokens" = Σ m): the additive form
    of `cmat_loss`, summed over micro-batches before the one division."""
    logp_BT, ent_BT = token_logp_entropy(
        model,
        batch,
        entropy=cfg.entropy,
        dropout_rng=dropout_rng,
        chunk_tokens=chunk_tokens,
        masked=True,
        temperature=cfg.temperature,
    )
    valid_BT = jnp.asarray(batch["loss_mask"]) > 0
    m_BT = valid_BT.astype(jnp.float32)
    logp_sg = jax.lax.stop_gradient(logp_BT)
    # Sanitize masked-out positions so padding garbage (inf, NaN) cannot leak into values or
    # gradients: ρ = 1, KL = 0 and zero weights there.
    b: dict[str, jax.Array] = {}
    for k in ("advantage", "weight", "anchor"):
        if k in batch:
            b[k] = jnp.where(valid_BT, _per_token(batch[k], logp_BT), 0.0)
    for k in ("behavior_logp", "ref_logp"):
        if k in batch:
            b[k] = jnp.where(valid_BT, jnp.asarray(batch[k], jnp.float32), logp_sg)

    obj_BT = cmat_token_loss(logp_BT, b, cfg)
    msum = lambda x: jnp.sum(jnp.where(valid_BT, x, 0.0))
    objective = msum(obj_BT)
    sg = jax.lax.stop_gradient
    nll_BT = -logp_sg
    sums = {
        "loss": sg(objective),
        "policy_loss": msum(sg(LOSSES[cfg.mode](logp_sg, b, cfg))),
        "nll": msum(nll_BT),
        "tokens": jnp.sum(m_BT),
    }
    if ent_BT is not None:
        sums["entropy"] = msum(ent_BT)
    if "ref_logp" in b:
        sums["kl"] = msum(k3_kl(logp_sg, b["ref_logp"]))
    if "behavior_logp" in b and cfg.mode != "rwr":  # rwr does not score at the behaviour's τ
        # Over sampled tokens only: anchor rows were never sampled (no behaviour log-prob).
        sampled_BT = 1.0 - b["anchor"] if "anchor" in b else m_BT
        ratio = jnp.exp(logp_sg - b["behavior_logp"])
        sums["ratio"] = msum(sampled_BT * ratio)
        sums["clip_frac"] = msum(sampled_BT * (jnp.abs(ratio - 1.0) > cfg.clip_eps))
        sums["sampled_tokens"] = msum(sampled_BT)
    if "weight" in b:
        sums["weighted_nll"] = msum(b["weight"] * nll_BT)
    if "anchor" in b:
        sums["anchor_tokens"] = msum(b["anchor"])
        sums["anchor_nll"] = msum(b["anchor"] * nll_BT)
    return objective, sums


def cmat_loss(
    trainable: Any,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    cfg: LossConfig,
    *,
    graphdef: Any,
    dropout_rng: jax.Array | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of docs/method.md §5; differentiate w.r.t. `trainable` (the LoRA params,
    an nnx.State or its pure dict). Bind `graphdef` with functools.partial for the 4-argument
    form. Metrics: loss, policy_loss, kl, ratio and clip_frac (pg, ppo; over the sampled, i.e.
    non-anchor, tokens), entropy, nll, weighted_nll, anchor_nll, tokens, anchor_tokens,
    sampled_tokens (those whose inputs are in the batch)."""
    loss = CMATLoss(cfg, chunk_tokens=chunk_tokens)
    objective, sums = loss.sums(graphdef, trainable, frozen, batch, dropout_rng)
    return objective / jnp.maximum(sums["tokens"], 1.0), finalize_metrics(sums, loss.denominators)


# ----------------------------------------------------------------------------- the batch


def validate_batch(batch: Mapping[str, Any], cfg: LossConfig) -> None:
    """Raise ValueError naming the field for a batch `cmat_loss` cannot consume (before jit)."""
    for k in cfg.required_keys():
        if batch.get(k) is None:
            raise ValueError(f"CMAT batch: missing field {k!r} (needed by mode {cfg.mode!r})")
    shape = tuple(np.shape(batch["inputs"]))
    if len(shape) != 2:
        raise ValueError(f"CMAT batch: field 'inputs' must be [B, T], got shape {shape}")
    for k in ("targets", *PER_TOKEN_KEYS):
        if batch.get(k) is not None and tuple(np.shape(batch[k])) != shape:
            raise ValueError(
                f"CMAT batch: field {k!r} has shape {np.shape(batch[k])}, expected {shape}"
            )
    for k in PER_ROW_OR_TOKEN_KEYS:
        if batch.get(k) is not None and tuple(np.shape(batch[k])) not in (shape, shape[:1]):
            raise ValueError(
                f"CMAT batch: field {k!r} has shape {np.shape(batch[k])}, "
                f"expected {shape[:1]} or {shape}"
            )
    if tuple(np.shape(batch["adapter_ids"])) != shape[:1]:
        raise ValueError(
            f"CMAT batch: field 'adapter_ids' has shape {np.shape(batch['adapter_ids'])}, "
            f"expected {shape[:1]}"
        )


# ----------------------------------------------------------------------------- the trainer's loss


@dataclasses.dataclass(frozen=True)
class CMATLoss(StepLoss):
    """`cmat_loss` as the train step's pluggable loss (`training.step.TrainStep(loss=...)`,
    interface `training.losses.StepLoss`): its additive sums, the CMAT batch fields, and
    `validate_batch` before jit."""

    cfg: LossConfig = LossConfig()
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    batch_keys: tuple[str, ...] = BATCH_KEYS
    denominators: ClassVar[Mapping[str, str]] = {
        "ratio": "sampled_tokens",
        "clip_frac": "sampled_tokens",
        "anchor_nll": "anchor_tokens",
    }

    def model_sums(
        self, model: nnx.Module, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return _cmat_model_sums(model, batch, self.cfg, dropout_rng, self.chunk_tokens)

    def validate(self, batch: Mapping[str, Any]) -> None:
        validate_batch(batch, self.cfg)
