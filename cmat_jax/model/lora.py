"""Multi-slot LoRA on a frozen base: per-example adapter ids pick a slot, -1 is the base model.

Adapters for all layers are stacked on a leading layer axis (like the base weights) so the
decoder's `lax.scan` carries them along. A is [L, S, in, r], B is [L, S, r, out].
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmat_jax.model.config import ModelConfig

# Short target names -> (base weight name in the decoder stack, logical axes of in / out dims).
TARGETS: dict[str, tuple[str, str, str]] = {
    "q": ("wq", "embed", "heads"),
    "k": ("wk", "embed", "kv_heads"),
    "v": ("wv", "embed", "kv_heads"),
    "o": ("wo", "heads", "embed"),
    "gate": ("w_gate", "embed", "mlp"),
    "up": ("w_up", "embed", "mlp"),
    "down": ("w_down", "mlp", "embed"),
}
# HF module names, accepted in target patterns too (e.g. "*_proj").
HF_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}

NONE_SLOT = -1  # adapter id of the frozen base model (the KL reference)


class LoRAParam(nnx.Param):
    """The only trainable variables: filter with `nnx.split(model, LoRAParam, ...)`."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the frozen base."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / rank) * x A B."""
    dropout: float = 0.0
    """Dropout on the adapter input (training only)."""
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    """Projections to adapt: short names (q k v o gate up down) or HF names / patterns (*_proj)."""
    slots: tuple[str, ...] = ("assistant",)
    """Adapter slots (one per agent role); 'none' is reserved for the base model."""
    dtype: str = "float32"
    """Storage dtype of the adapter weights (and of their optimizer state)."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.slots or len(set(self.slots)) != len(self.slots) or "none" in self.slots:
            raise ValueError(f"lora slots must be unique names other than 'none': {self.slots}")
        if not self.resolved_targets():
            raise ValueError(f"lora targets {self.targets} match none of {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def resolved_targets(self) -> tuple[str, ...]:
        return tuple(
            t
            for t in TARGETS
            if any(fnmatch.fnmatch(t, p) or fnmatch.fnmatch(HF_NAMES[t], p) for p in self.targets)
        )

    def slot_id(self, name: str) -> int:
        if name == "none":
            return NONE_SLOT
        if name not in self.slots:
            raise ValueError(f"unknown adapter slot {name!r}; slots: none, {', '.join(self.slots)}")
        return self.slots.index(name)


def target_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    sizes = {
        "embed": cfg.hidden_size,
        "heads": cfg.q_dim,
        "kv_heads": cfg.kv_dim,
        "mlp": cfg.intermediate_size,
    }
    _, d_in, d_out = TARGETS[target]
    return sizes[d_in], sizes[d_out]


class LoRA(nnx.Module):
    """Adapters for every target of every layer, `len(slots)` slots each."""

    def __init__(self, cfg: ModelConfig, lora_cfg: LoRAConfig, *, rngs: nnx.Rngs):
        self.config = lora_cfg
        L, S, r = cfg.num_layers, len(lora_cfg.slots), lora_cfg.rank
        dtype = jnp.dtype(lora_cfg.dtype)
        self.a = nnx.data({})
        self.b = nnx.data({})
        for t in lora_cfg.resolved_targets():
            d_in, d_out = target_dims(cfg, t)
            _, ax_in, ax_out = TARGETS[t]
            # kaiming-uniform(a=sqrt(5)) on A as PEFT does: bound = 1/sqrt(fan_in); B = 0.
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(rngs.params(), (L, S, d_in, r), jnp.float32, -bound, bound)
            self.a[t] = LoRAParam(
                a.astype(dtype), logical_axes=("layers", None, ax_in, "lora_rank")
            )
            self.b[t] = LoRAParam(
                jnp.zeros((L, S, r, d_out), dtype),
                logical_axes=("layers", None, "lora_rank", ax_out),
            )

    def stacked(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        return {t: (self.a[t][...], self.b[t][...]) for t in self.a}


def lora_delta(
    x_BTD: jax.Array,
    a_SDR: jax.Array,
    b_SRN: jax.Array,
    adapter_ids_B: jax.Array,
    scale: float,
    compute_dtype: jnp.dtype,
    dropout_mask_BTD: jax.Array | None = None,
) -> jax.Array:
    """scale * x @ A[id] @ B[id] per row; rows with id -1 get exactly zero."""
    ids_B = jnp.maximum(adapter_ids_B, 0)
    a_BDR = a_SDR[ids_B].astype(compute_dtype)
    b_BRN = b_SRN[ids_B].astype(compute_dtype)
    if dropout_mask_BTD is not None:
        x_BTD = x_BTD * dropout_mask_BTD
    h_BTR = jnp.einsum(
        "btd,bdr->btr", x_BTD.astype(compute_dtype), a_BDR, preferred_element_type=jnp.float32
    )
    y_BTN = jnp.einsum(
        "btr,brn->btn", h_BTR.astype(compute_dtype), b_BRN, preferred_element_type=jnp.float32
    )
    keep_B = (adapter_ids_B >= 0).astype(jnp.float32) * scale
    return y_BTN * keep_B[:, None, None]


def merged_weights(model: nnx.Module, slot: str) -> dict[str, np.ndarray]:
    """Base weights with one slot's adapter folded in: W + scale * A @ B (numpy, float32)."""
    lora: LoRA = model.lora
    s = lora.config.slot_id(slot)
    if s < 0:
        raise ValueError("slot 'none' is the base model; nothing to merge")
    out = {}
    for t, (a, b) in lora.stacked().items():
        name = TARGETS[t][0]
        w = np.asarray(getattr(model.layers, name)[...], np.float32)
        delta = np.einsum(
            "ldr,lrn->ldn", np.asarray(a[:, s], np.float32), np.asarray(b[:, s], np.float32)
        )
        out[name] = w + lora.config.scale * delta
    return out


def set_lora_params(model: nnx.Module, params: Any) -> None:
    """Put LoRA params (a pure dict shaped like the model's LoRA state) into ``model``."""
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    lora_state.replace_by_pure_dict(params)
    nnx.update(model, lora_state)
