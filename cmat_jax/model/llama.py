"""The Llama-family decoder (Llama, Mistral, Qwen2) in Flax NNX — the whole model in one file.

Layer weights are stacked on a leading `layers` axis and the decoder runs as one `lax.scan`,
so compile time does not grow with depth. Linear weights are stored [in, out]. The residual
stream, norms and softmax statistics are float32; matmul inputs are cast to `compute_dtype`
and accumulate in float32 (`preferred_element_type`), which is also the fast path on CPU.

Shapes: B batch, T query length, S key length / cache length, D hidden, H query heads,
K kv heads, Dh head dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cmat_jax.model.attention import attention
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.lora import TARGETS, LoRA, LoRAConfig, lora_delta

# (param name, shape fn, logical axes); every layer param gets a leading "layers" axis.
_LAYER_PARAMS: dict[str, tuple[Any, tuple[str | None, ...]]] = {
    "attn_norm": (lambda c: (c.hidden_size,), ("embed",)),
    "wq": (lambda c: (c.hidden_size, c.q_dim), ("embed", "heads")),
    "wk": (lambda c: (c.hidden_size, c.kv_dim), ("embed", "kv_heads")),
    "wv": (lambda c: (c.hidden_size, c.kv_dim), ("embed", "kv_heads")),
    "wo": (lambda c: (c.q_dim, c.hidden_size), ("heads", "embed")),
    "mlp_norm": (lambda c: (c.hidden_size,), ("embed",)),
    "w_gate": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp")),
    "w_up": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp")),
    "w_down": (lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed")),
}
_QKV_BIAS = {
    "bq": (lambda c: (c.q_dim,), ("heads",)),
    "bk": (lambda c: (c.kv_dim,), ("kv_heads",)),
    "bv": (lambda c: (c.kv_dim,), ("kv_heads",)),
}
_O_BIAS = {"bo": (lambda c: (c.hidden_size,), ("embed",))}


def layer_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    specs = dict(_LAYER_PARAMS)
    if cfg.qkv_bias:
        specs.update(_QKV_BIAS)
    if cfg.o_bias:
        specs.update(_O_BIAS)
    return {
        n: ((cfg.num_layers, *shape(cfg)), ("layers", *axes)) for n, (shape, axes) in specs.items()
    }


class KVCache(NamedTuple):
    """Preallocated per-layer keys/values. Row b's valid slots are [start_B[b], index)."""

    k_LBSKD: jax.Array
    v_LBSKD: jax.Array
    start_B: jax.Array  # first valid slot per row (left padding before it)
    index: jax.Array  # scalar int32: next slot to write, the same for every row

    @classmethod
    def init(
        cls,
        cfg: ModelConfig,
        batch: int,
        length: int,
        dtype: Any = jnp.bfloat16,
        start_B: jax.Array | None = None,
    ) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        start = jnp.zeros((batch,), jnp.int32) if start_B is None else start_B.astype(jnp.int32)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), start, jnp.zeros((), jnp.int32)
        )


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(
            init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt),
            logical_axes=("vocab", "embed"),
        )
        self.layers = DecoderStack(cfg, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pdt), logical_axes=("embed",))
        self.lm_head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(
                init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt),
                logical_axes=("embed", "vocab"),
            )
        self.lora = nnx.data(None)

    def add_lora(self, lora_cfg: LoRAConfig, *, rngs: nnx.Rngs) -> None:
        self.lora = LoRA(self.config, lora_cfg, rngs=rngs)

    def head_weight_DV(self) -> jax.Array:
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def __call__(
        self,
        input_ids_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        adapter_ids_B: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [B, T, V] float32 (and the updated cache when one is given)."""
        h_BTD, cache = self.hidden(
            input_ids_BT,
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            adapter_ids_B=adapter_ids_B,
            cache=cache,
            dropout_rng=dropout_rng,
        )
        logits_BTV = matmul(h_BTD, self.head_weight_DV(), self.config.compute_dtype)
        return logits_BTV if cache is None else (logits_BTV, cache)

    def hidden(
        self,
        input_ids_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        adapter_ids_B: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] float32 — the input of a chunked LM-head loss."""
        cfg = self.config
        input_ids_BT = jnp.asarray(input_ids_BT, jnp.int32)
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            if cache is not None:
                positions_BT = positions_BT + cache.index - cache.start_B[:, None]
        if cfg.sliding_window is not None and cfg.sliding_window < T:
            raise ValueError(
                f"sequence length {T} exceeds the model's sliding_window {cfg.sliding_window}; "
                "sliding-window attention is not implemented"
            )
        x_BTD = self.embed[...][input_ids_BT].astype(jnp.float32)
        rope = rope_tables(cfg, positions_BT)
        lora = None
        if self.lora is not None and adapter_ids_B is not None:
            lora = self.lora.stacked()
            adapter_ids_B = jnp.asarray(adapter_ids_B, jnp.int32)
        x_BTD, cache = decoder(
            cfg,
            self.layers.stacked(),
            x_BTD,
            rope,
            segment_ids_BT,
            lora=lora,
            lora_cfg=None if lora is None else self.lora.config,
            adapter_ids_B=adapter_ids_B,
            cache=cache,
            dropout_rng=dropout_rng,
        )
        return rms_norm(x_BTD, self.final_norm[...], cfg.rms_norm_eps), cache


class DecoderStack(nnx.Module):
    """All decoder layers' weights, each stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        for name, (shape, axes) in layer_param_specs(cfg).items():
            if name.endswith("norm"):
                value = jnp.ones(shape, pdt)
            elif name.startswith("b"):
                value = jnp.zeros(shape, pdt)
            else:
                value = init(rngs.params(), shape, pdt)
            setattr(self, name, nnx.Param(value, logical_axes=axes))

    def stacked(self) -> dict[str, jax.Array]:
        return {n: v[...] for n, v in vars(self).items() if isinstance(v, nnx.Param)}


# ----------------------------------------------------------------------------- pure functions


def matmul(x: jax.Array, w: jax.Array, compute_dtype: str) -> jax.Array:
    dt = jnp.dtype(compute_dtype)
    return jnp.einsum(
        "...d,dn->...n", x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32
    )


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(jnp.float32)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / cfg.head_dim))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc.kind == "linear":
        return inv / sc.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * jnp.pi / inv
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    mid = (1 - smooth) * inv / sc.factor + smooth * inv
    return jnp.where(
        wavelen > low_wavelen, inv / sc.factor, jnp.where(wavelen < high_wavelen, inv, mid)
    )


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    angles_BTd = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    return jnp.cos(angles_BTd), jnp.sin(angles_BTd)


def apply_rope(x_BTHD: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    # HF convention: rotate the first half of head_dim against the second half.
    cos, sin = (t[:, :, None, :] for t in rope)
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def decoder(
    cfg: ModelConfig,
    params: dict[str, jax.Array],
    x_BTD: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    segment_ids_BT: jax.Array | None,
    *,
    lora: dict[str, tuple[jax.Array, jax.Array]] | None = None,
    lora_cfg: LoRAConfig | None = None,
    adapter_ids_B: jax.Array | None = None,
    cache: KVCache | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """All layers as one scan; returns the residual stream and the updated cache."""
    L = cfg.num_layers
    drop_keys = None if dropout_rng is None else jax.random.split(dropout_rng, L)

    def layer(x_BTD, xs):
        p, lora_l, kv_l, key = xs
        x_BTD, kv_l = decoder_layer(
            cfg,
            p,
            x_BTD,
            rope,
            segment_ids_BT,
            lora_l=lora_l,
            lora_cfg=lora_cfg,
            adapter_ids_B=adapter_ids_B,
            cache=cache,
            kv_l=kv_l,
            dropout_key=key,
        )
        return x_BTD, kv_l

    if cfg.remat == "full":
        layer = jax.checkpoint(layer, prevent_cse=False)
    elif cfg.remat == "dots_saveable":
        layer = jax.checkpoint(
            layer,
            prevent_cse=False,
            policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        )
    kv = None if cache is None else (cache.k_LBSKD, cache.v_LBSKD)
    x_BTD, kv = jax.lax.scan(layer, x_BTD, (params, lora, kv, drop_keys))
    if cache is not None:
        T = x_BTD.shape[1]
        cache = cache._replace(k_LBSKD=kv[0], v_LBSKD=kv[1], index=cache.index + T)
    return x_BTD, cache


def decoder_layer(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    x_BTD: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    segment_ids_BT: jax.Array | None,
    *,
    lora_l: dict[str, tuple[jax.Array, jax.Array]] | None,
    lora_cfg: LoRAConfig | None,
    adapter_ids_B: jax.Array | None,
    cache: KVCache | None,
    kv_l: tuple[jax.Array, jax.Array] | None,
    dropout_key: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    B, T, _ = x_BTD.shape
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cdt = cfg.compute_dtype
    keys = iter(jax.random.split(dropout_key, len(TARGETS))) if dropout_key is not None else None

    def proj(target: str, x: jax.Array, bias: str | None = None) -> jax.Array:
        name = TARGETS[target][0]
        y = matmul(x, p[name], cdt)
        if bias is not None and bias in p:
            y = y + p[bias].astype(jnp.float32)
        if lora_l is not None and target in lora_l:
            a, b = lora_l[target]
            mask = None
            if keys is not None and lora_cfg.dropout > 0:
                keep = 1.0 - lora_cfg.dropout
                mask = jax.random.bernoulli(next(keys), keep, x.shape).astype(x.dtype) / keep
            y = y + lora_delta(x, a, b, adapter_ids_B, lora_cfg.scale, jnp.dtype(cdt), mask)
        return y

    # Attention block.
    h_BTD = rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps)
    q_BTHD = apply_rope(proj("q", h_BTD, "bq").reshape(B, T, H, Dh), rope)
    k_BTKD = apply_rope(proj("k", h_BTD, "bk").reshape(B, T, K, Dh), rope)
    v_BTKD = proj("v", h_BTD, "bv").reshape(B, T, K, Dh)
    adt = jnp.dtype(cdt)
    if cache is None:
        o_BTHD = attention(
            q_BTHD.astype(adt),
            k_BTKD.astype(adt),
            v_BTKD.astype(adt),
            segment_ids_BT=segment_ids_BT,
            causal=True,
            impl=cfg.attention_impl,
        )
    else:
        k_BSKD, v_BSKD = kv_l
        k_BSKD = jax.lax.dynamic_update_slice(
            k_BSKD, k_BTKD.astype(k_BSKD.dtype), (0, cache.index, 0, 0)
        )
        v_BSKD = jax.lax.dynamic_update_slice(
            v_BSKD, v_BTKD.astype(v_BSKD.dtype), (0, cache.index, 0, 0)
        )
        kv_l = (k_BSKD, v_BSKD)
        o_BTHD = cached_attention(q_BTHD.astype(adt), k_BSKD, v_BSKD, cache.start_B, cache.index)
    x_BTD = x_BTD + proj("o", o_BTHD.reshape(B, T, H * Dh), "bo")

    # SwiGLU MLP block.
    h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
    g_BTF = proj("gate", h_BTD)
    u_BTF = proj("up", h_BTD)
    x_BTD = x_BTD + proj("down", (jax.nn.silu(g_BTF) * u_BTF).astype(adt))
    return x_BTD, kv_l


def cached_attention(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, start_B: jax.Array, index: jax.Array
) -> jax.Array:
    """Queries at slots [index, index+T) attend to slots [start_B, own slot] of the cache."""
    B, T, H, Dh = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    q_BKGTD = q_BTHD.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)
    s_BKGTS = (
        jnp.einsum(
            "bkgtd,bskd->bkgts",
            q_BKGTD,
            k_BSKD.astype(q_BTHD.dtype),
            preferred_element_type=jnp.float32,
        )
        * Dh**-0.5
    )
    slot_S = jnp.arange(S)
    q_slot_T = index + jnp.arange(T)
    valid_BTS = (slot_S[None, None, :] <= q_slot_T[None, :, None]) & (
        slot_S[None, None, :] >= start_B[:, None, None]
    )
    s_BKGTS = jnp.where(valid_BTS[:, None, None], s_BKGTS, -1e30)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BKGTD = jnp.einsum(
        "bkgts,bskd->bkgtd",
        p_BKGTS.astype(q_BTHD.dtype),
        v_BSKD.astype(q_BTHD.dtype),
        preferred_element_type=jnp.float32,
    )
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
