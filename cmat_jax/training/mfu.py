"""Model FLOPs utilization (MFU), MaxText convention.

FLOPs per trained token = 3 x forward FLOPs, where the forward pass counts

- every matmul weight once, 2 FLOPs per multiply-add: `2 * matmul_params` (q/k/v/o, gate/up/down
  of every layer, the LM head — a tied head still is a matmul; the embedding lookup is not), and
- attention scores and the weighted sum, `2 * 2 * T * H * Dh` per token per layer, halved for a
  causal mask (only the lower triangle is work): `2 * T * H * Dh`.

Training is 3 x forward (forward + backward w.r.t. activations + backward w.r.t. weights), i.e.
`6 * matmul_params + 6 * L * T * H * Dh` per token. This is the MaxText / PaLM "model FLOPs"
number, so MFU is comparable across frameworks. With LoRA on a frozen base the weight-gradient
matmuls of the base are never computed, so the hardware does ~2/3 of these FLOPs; the
convention still counts them (that is what makes MFU comparable, and it is what peers report).
LoRA's own matmuls (rank r, < 1% at r = 16) are added when `lora_rank` is given.

Peaks are dense bf16 per device (one JAX device: a GPU, or a TPU chip / core as JAX lists it).
On CPU there is no spec sheet: `measured_cpu_peak()` times a bf16 x bf16 -> f32 matmul, the
same op the model's matmuls use, and MFU divides by that one number for the whole process
(fake host devices share the same cores).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

from cmat_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per JAX device (vendor spec sheets, no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "h100": 989.4e12,  # H100 SXM5
    "h200": 989.4e12,  # H200 SXM: same tensor cores as H100 SXM, more and faster HBM
    "a100": 312e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
}

# `device_kind` substrings (lower case) -> PEAK_FLOPS key; first match wins, so the more
# specific strings come first ("tpu v5 lite" is v5e, a bare "tpu v5" is v5p).
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h100", "h100"),
    ("h200", "h200"),
    ("a100", "a100"),
    ("v5 lite", "tpu-v5e"),
    ("v5e", "tpu-v5e"),
    ("v5p", "tpu-v5p"),
    ("tpu v5", "tpu-v5p"),
    ("v6 lite", "tpu-v6e"),
    ("v6e", "tpu-v6e"),
    ("tpu v4", "tpu-v4"),
)

_LORA_TARGET_DIMS = ("q", "k", "v", "o", "gate", "up", "down")


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all projections plus the LM head."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = D * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * D + 3 * D * F
    return L * per_layer + D * cfg.vocab_size


def lora_matmul_params(
    cfg: ModelConfig, rank: int, targets: Sequence[str] = _LORA_TARGET_DIMS
) -> int:
    """Weights of the LoRA A and B matrices of one adapter (r * (in + out) per target)."""
    from cmat_jax.model.lora import target_dims

    return cfg.num_layers * sum(rank * sum(target_dims(cfg, t)) for t in targets)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward attention FLOPs per token over all layers (QK^T and PV), causal halved."""
    flops = 4.0 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return flops / 2 if causal else flops


def training_flops_per_token(
    cfg: ModelConfig,
    seq_len: int,
    *,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = _LORA_TARGET_DIMS,
    causal: bool = True,
) -> float:
    """MaxText training FLOPs per token: 3 x (2 x matmul params + causal attention)."""
    params = matmul_params(cfg)
    if lora_rank:
        params += lora_matmul_params(cfg, lora_rank, lora_targets)
    return 3.0 * (2.0 * params + attention_flops_per_token(cfg, seq_len, causal=causal))


def peak_key(device_kind: str) -> str | None:
    """PEAK_FLOPS key for a JAX `device_kind` string, or None (CPU / unknown)."""
    kind = device_kind.lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            return key
    return None


def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted bf16 [n, n] x [n, n] -> f32 matmuls on CPU."""
    return _measured_cpu_peak(n, repeats)


@functools.cache
def _measured_cpu_peak(n: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), jnp.bfloat16), cpu)
    b = jax.device_put(jax.random.normal(k2, (n, n), jnp.bfloat16), cpu)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(devices: Sequence | None = None) -> tuple[float, str]:
    """(total peak FLOP/s of `devices`, a label). Accelerators: spec-sheet peak x count;
    CPU: one measured peak for the whole process (host devices share the cores)."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind
    key = peak_key(kind)
    if key is not None:
        return PEAK_FLOPS[key] * len(devices), key
    if devices[0].platform == "cpu":
        return measured_cpu_peak(), "cpu-measured"
    raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; add it to mfu.PEAK_FLOPS")


def mfu(flops_per_token: float, tokens_per_second: float, peak_total: float) -> float:
    """Fraction of peak: achieved model FLOP/s over the devices' total peak FLOP/s."""
    if peak_total <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_total}")
    return flops_per_token * tokens_per_second / peak_total


class MFUMeter:
    """Turns (step time, tokens per step) into MFU metrics for the training log.

    Tokens are the padded row length x rows (what the device computes), not only the
    loss-masked ones.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        seq_len: int,
        *,
        lora_rank: int = 0,
        devices: Sequence | None = None,
    ):
        self.flops_per_token = training_flops_per_token(cfg, seq_len, lora_rank=lora_rank)
        self.peak_total, self.peak_label = peak_flops(devices)
        import jax

        self.num_devices = len(list(jax.devices() if devices is None else devices))

    def metrics(self, step_seconds: float, tokens: int) -> dict[str, float]:
        if step_seconds <= 0:
            raise ValueError(f"step time must be positive, got {step_seconds}")
        tps = tokens / step_seconds
        achieved = self.flops_per_token * tps
        return {
            "mfu": achieved / self.peak_total,
            "tflops_per_device": achieved / self.num_devices / 1e12,
            "tokens_per_second": tps,
        }
