"""The Llama-family decoder (Llama, Mistral, Qwen2) in Flax NNX — the whole model in one file.

Layer weights are stacked on a leading `layers` axis and the decoder runs as one `lax.scan`,
so compile time does not grow with depth. Linear weights are stored [in, out]. The residual
stream, norms and softmax statistics are float32; matmul inputs are cast to `compute_dtype`
and accumulate in float32 (`preferred_element_type`), which is also the fast path on CPU.

Shapes: B batch, T query length, S key length / cache length, D hidden, H query heads,
K kv heads, Dh head dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cmat_jax.model.attention import attention, decode_attention, target_platform
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


def to_scan_bits(a: jax.Array) -> jax.Array:
    """bf16 -> its uint16 bits. XLA:CPU converts a whole stacked bf16 array to f32 each time
    `lax.scan` slices it (measured ~30x slower layer loop); slicing uint16 bits does not."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def from_scan_bits(a: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


class KVCache(NamedTuple):
    """Preallocated keys/values, [L, B, K, S, Dh] (a layer's slice is a ready batched-matmul
    operand), bf16 stored as uint16 bits. Row b's valid slots are [start_B[b], index)."""

    k_LBKSD: jax.Array
    v_LBKSD: jax.Array
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
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        start = jnp.zeros((batch,), jnp.int32) if start_B is None else start_B.astype(jnp.int32)
        k, v = (to_scan_bits(jnp.zeros(shape, dtype)) for _ in range(2))
        return cls(k, v, start, jnp.zeros((), jnp.int32))

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.bfloat16) if self.k_LBKSD.dtype == jnp.uint16 else self.k_LBKSD.dtype


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
        prefill: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [B, T, V] float32 (and the updated cache when one is given)."""
        h_BTD, cache = self.hidden(
            input_ids_BT,
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            adapter_ids_B=adapter_ids_B,
            cache=cache,
            prefill=prefill,
            dropout_rng=dropout_rng,
        )
        logits_BTV = self.logits(h_BTD)
        return logits_BTV if cache is None else (logits_BTV, cache)

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """LM-head logits f32. A tied head contracts against `embed` [V, D] as stored: its
        transpose is a slow bf16 matmul layout on CPU."""
        dt = jnp.dtype(self.config.compute_dtype)
        if self.lm_head is None:
            w_VD = from_scan_bits(self.embed[...]).astype(dt)
            return jnp.einsum(
                "...d,vd->...v", h_BTD.astype(dt), w_VD, preferred_element_type=jnp.float32
            )
        return matmul(h_BTD, from_scan_bits(self.lm_head[...]), self.config.compute_dtype)

    def hidden(
        self,
        input_ids_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        adapter_ids_B: jax.Array | None = None,
        cache: KVCache | None = None,
        prefill: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] float32 — the input of a chunked LM-head loss.

        With a cache, the T new tokens of each row go to slots [index, index+T) and attend to
        the valid slots [start_B, own slot]; `prefill=True` (static) promises an empty cache
        (index 0) and skips reading it: the prompt's causal attention then runs through
        `attention(impl=config.attention_impl)` (with "xla", over the new slots as above).
        """
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
        x_BTD = from_scan_bits(self.embed[...][input_ids_BT]).astype(jnp.float32)
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
            prefill=prefill,
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
    """x @ w with inputs in `compute_dtype`, accumulated and returned in float32."""
    return _matmul_fn(jnp.dtype(compute_dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype))(x, w)


@functools.cache
def _matmul_fn(cdt: jnp.dtype, x_dt: jnp.dtype, w_dt: jnp.dtype) -> Any:
    # Autodiff of a bf16 x bf16 -> f32 dot gives f32-cotangent x bf16 backward dots, which run at
    # f32 speed on CPU; casting the cotangent to the compute dtype keeps them bf16 x bf16
    # (measured ~1.3x per training step). In f32 this is exactly the autodiff result.
    def fwd_dot(xc: jax.Array, wc: jax.Array) -> jax.Array:
        return jnp.einsum("...d,dn->...n", xc, wc, preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def mm(x: jax.Array, w: jax.Array) -> jax.Array:
        return fwd_dot(x.astype(cdt), w.astype(cdt))

    def fwd(x, w):
        xc, wc = x.astype(cdt), w.astype(cdt)
        return fwd_dot(xc, wc), (xc, wc)

    def bwd(res, dy):
        xc, wc = res
        dyc = dy.astype(cdt)
        dx = jnp.einsum("...n,dn->...d", dyc, wc, preferred_element_type=jnp.float32)
        dw = jnp.einsum("...d,...n->dn", xc, dyc, preferred_element_type=jnp.float32)
        return dx.astype(x_dt), dw.astype(w_dt)

    mm.defvjp(fwd, bwd)
    return mm


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
    prefill: bool = False,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """All layers as one scan; returns the residual stream and the updated cache.

    The frozen base weights cross the scan as uint16 bits when bf16 (see `to_scan_bits`; they
    take no gradient). LoRA weights cross as they are, so they stay differentiable.
    """
    L = cfg.num_layers
    drop_keys = None if dropout_rng is None else jax.random.split(dropout_rng, L)
    old_kv = None if cache is None or prefill else (cache.k_LBKSD, cache.v_LBKSD)

    def layer(x_BTD, xs):
        p, lora_l, kv_l, key = jax.tree.map(from_scan_bits, xs)
        x_BTD, new_kv = decoder_layer(
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
        return x_BTD, None if new_kv is None else jax.tree.map(to_scan_bits, new_kv)

    if cfg.remat == "full":
        layer = jax.checkpoint(layer, prevent_cse=False)
    elif cfg.remat == "dots_saveable":
        layer = jax.checkpoint(
            layer,
            prevent_cse=False,
            policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        )
    xs = (jax.tree.map(to_scan_bits, params), lora, old_kv, drop_keys)
    x_BTD, new_kv = jax.lax.scan(layer, x_BTD, xs)
    if cache is not None:
        # New keys/values are written once, after the layer loop: the cache is never copied.
        at = (0, 0, 0, cache.index, 0)
        cache = cache._replace(
            k_LBKSD=jax.lax.dynamic_update_slice(cache.k_LBKSD, new_kv[0], at),
            v_LBKSD=jax.lax.dynamic_update_slice(cache.v_LBKSD, new_kv[1], at),
            index=cache.index + x_BTD.shape[1],
        )
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
    new_kv = None
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
        new_kv = (
            k_BTKD.transpose(0, 2, 1, 3).astype(cache.dtype),
            v_BTKD.transpose(0, 2, 1, 3).astype(cache.dtype),
        )
        if kv_l is None and T > 1 and cfg.attention_impl != "xla":
            # Prefill into an empty cache is causal self-attention over the prompt: the
            # configured kernel streams it instead of holding [T, T] scores (measured on the
            # 2-core CPU, batch 16: "chunked" 1.8x faster at T=1024, 5% slower at T=256).
            # Keys/values rounded to the cache dtype, as the cached path reads them.
            k_BTKD, v_BTKD = (a.astype(cache.dtype).astype(adt) for a in (k_BTKD, v_BTKD))
            o_BTHD = prefill_attention(
                q_BTHD.astype(adt), k_BTKD, v_BTKD, cache.start_B, impl=cfg.attention_impl
            )
        elif kv_l is not None and T == 1 and _decode_kernel_wanted(cfg.attention_impl):
            o_BTHD = decode_step_attention(
                q_BTHD.astype(adt), *new_kv, kv_l, cache.start_B, cache.index
            )
        else:
            o_BTHD = cached_attention(q_BTHD.astype(adt), *new_kv, kv_l, cache.start_B, cache.index)
    x_BTD = x_BTD + proj("o", o_BTHD.reshape(B, T, H * Dh), "bo")

    # SwiGLU MLP block.
    h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
    g_BTF = proj("gate", h_BTD)
    u_BTF = proj("up", h_BTD)
    x_BTD = x_BTD + proj("down", (jax.nn.silu(g_BTF) * u_BTF).astype(adt))
    return x_BTD, new_kv


def prefill_attention(
    q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, start_B: jax.Array, *, impl: str
) -> jax.Array:
    """Causal attention of a left-padded prompt (row b's tokens start at slot start_B[b]) with
    `attention(impl=...)`: the padding is segment 0, so real tokens never attend to it."""
    T = q_BTHD.shape[1]
    seg_BT = (jnp.arange(T)[None, :] >= start_B[:, None]).astype(jnp.int32)
    o_BTHD = attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=seg_BT, causal=True, impl=impl)
    return o_BTHD.astype(jnp.float32)


def _decode_kernel_wanted(impl: str) -> bool:
    """One-token decode steps use the Pallas decode kernel for impl "pallas", and for "auto"
    on GPU / TPU; otherwise `cached_attention` (XLA)."""
    return impl == "pallas" or (impl == "auto" and target_platform() in ("gpu", "tpu"))


def decode_step_attention(
    q_B1HD: jax.Array,
    k_new_BK1D: jax.Array,
    v_new_BK1D: jax.Array,
    old_kv: tuple[jax.Array, jax.Array],
    start_B: jax.Array,
    index: jax.Array,
) -> jax.Array:
    """One new token per row: the Pallas decode kernel over cached slots [start_B, index), then
    the token's own key/value (written to the cache after the layer loop) merged into the same
    softmax through the kernel's logsumexp. -> [B, 1, H, Dh] float32."""
    B, _, H, Dh = q_B1HD.shape
    K = k_new_BK1D.shape[1]
    q_BHD = q_B1HD[:, 0].astype(jnp.float32)
    o_old_BHD, lse_old_BH = decode_attention(
        q_BHD,
        *old_kv,
        kv_start_B=start_B,
        kv_end_B=jnp.broadcast_to(index, (B,)),
        impl="pallas",
        return_lse=True,
    )
    k_BKD, v_BKD = (x[:, :, 0].astype(jnp.float32) for x in (k_new_BK1D, v_new_BK1D))
    q_BKGD = q_BHD.astype(k_new_BK1D.dtype).astype(jnp.float32).reshape(B, K, H // K, Dh)
    s_self_BH = jnp.einsum("bkgd,bkd->bkg", q_BKGD, k_BKD).reshape(B, H) * Dh**-0.5
    m_BH = jnp.maximum(lse_old_BH, s_self_BH)
    w_old_BH, w_self_BH = jnp.exp(lse_old_BH - m_BH), jnp.exp(s_self_BH - m_BH)
    v_self_BHD = jnp.repeat(v_BKD, H // K, axis=1)
    o_BHD = (w_old_BH[..., None] * o_old_BHD + w_self_BH[..., None] * v_self_BHD) / (
        w_old_BH + w_self_BH
    )[..., None]
    return o_BHD[:, None]


def cached_attention(
    q_BTHD: jax.Array,
    k_BKTD: jax.Array,
    v_BKTD: jax.Array,
    old_kv: tuple[jax.Array, jax.Array] | None,
    start_B: jax.Array,
    index: jax.Array,
) -> jax.Array:
    """Queries at slots index + t attend to cached slots [start_B, index) and new slots <= own.

    One softmax over [new | cached] scores; the cache part is skipped when `old_kv` is None
    (prefill into an empty cache)."""
    B, T, H, Dh = q_BTHD.shape
    K = k_BKTD.shape[1]
    dt = q_BTHD.dtype
    q_BKGTD = q_BTHD.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)

    def scores(k_BKSD: jax.Array) -> jax.Array:
        s = jnp.einsum(
            "bkgtd,bksd->bkgts", q_BKGTD, k_BKSD.astype(dt), preferred_element_type=jnp.float32
        )
        return s * Dh**-0.5

    def weighted(p_BKGTS: jax.Array, v_BKSD: jax.Array) -> jax.Array:
        return jnp.einsum(
            "bkgts,bksd->bkgtd", p_BKGTS, v_BKSD.astype(dt), preferred_element_type=jnp.float32
        )

    slot_T = index + jnp.arange(T)
    ok_BTT = (slot_T[None, None, :] <= slot_T[None, :, None]) & (
        slot_T[None, None, :] >= start_B[:, None, None]
    )
    s_BKGTS = jnp.where(ok_BTT[:, None, None], scores(k_BKTD), -1e30)
    if old_kv is not None:
        slot_S = jnp.arange(old_kv[0].shape[2])
        ok_BS = (slot_S[None] >= start_B[:, None]) & (slot_S[None] < index)
        s_old_BKGTS = jnp.where(ok_BS[:, None, None, None], scores(old_kv[0]), -1e30)
        s_BKGTS = jnp.concatenate([s_BKGTS, s_old_BKGTS], axis=-1)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(dt)
    o_BKGTD = weighted(p_BKGTS[..., :T], v_BKTD)
    if old_kv is not None:
        o_BKGTD = o_BKGTD + weighted(p_BKGTS[..., T:], old_kv[1])
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
