"""MFU: the MaxText FLOPs formula on hand-computed examples, the peak table, the CPU peak."""

from __future__ import annotations

import pytest

from cmat_jax.model.config import ModelConfig
from cmat_jax.training import mfu
from cmat_jax.weights.registry import PRESETS

TINY = ModelConfig(
    vocab_size=10,
    hidden_size=4,
    intermediate_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=2,
)


def test_tiny_model_by_hand():
    # Per layer: q 4x4 + k 4x2 + v 4x2 = 32, o 4x4 = 16, gate/up/down 3 x 4x8 = 96 -> 144.
    # Two layers 288 + LM head 4x10 = 40 -> 328 matmul weights (the embedding lookup is free).
    assert mfu.matmul_params(TINY) == 328
    # Attention at T = 8: 4 * T * H * Dh * L = 4*8*2*2*2 = 256, halved for causal = 128.
    assert mfu.attention_flops_per_token(TINY, 8) == 128
    assert mfu.attention_flops_per_token(TINY, 8, causal=False) == 256
    # Training = 3 x forward = 3 * (2 * 328 + 128).
    assert mfu.training_flops_per_token(TINY, 8) == 3 * (2 * 328 + 128) == 2352


def test_lora_matmuls_are_added():
    # r = 1: r * (in + out) per target: q 8, k 6, v 6, o 8, gate 12, up 12, down 12 = 64/layer.
    assert mfu.lora_matmul_params(TINY, 1) == 128
    assert mfu.training_flops_per_token(TINY, 8, lora_rank=1) == 3 * (2 * (328 + 128) + 128)


def test_llama2_7b_at_4096():
    cfg = ModelConfig.from_hf(PRESETS["llama2-7b"].config())
    # 32 x (4096 x 12288 + 4096 x 4096 + 3 x 4096 x 11008) + 4096 x 32000
    assert mfu.matmul_params(cfg) == 6_607_077_376
    # + causal attention 3 x 2 x 4096 x 32 x 128 x 32 per token.
    assert mfu.training_flops_per_token(cfg, 4096) == 3 * (2 * 6_607_077_376 + 1_073_741_824)


def test_mfu_and_meter_arithmetic():
    assert mfu.mfu(2352, 1000.0, 1e7) == pytest.approx(0.2352)
    with pytest.raises(ValueError, match="positive"):
        mfu.mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("TPU v5 lite", "tpu-v5e"),
        ("TPU v5e", "tpu-v5e"),
        ("TPU v5", "tpu-v5p"),
        ("TPU v5p", "tpu-v5p"),
        ("TPU v6 lite", "tpu-v6e"),
        ("TPU v4", "tpu-v4"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("cpu", None),
    ],
)
def test_device_kinds_map_to_peaks(kind, key):
    assert mfu.peak_key(kind) == key


def test_peak_table_is_dense_bf16_per_device():
    assert mfu.PEAK_FLOPS["h100"] == 989.4e12
    assert mfu.PEAK_FLOPS["tpu-v5e"] == 197e12
    assert mfu.PEAK_FLOPS["tpu-v5p"] == 459e12
    assert mfu.PEAK_FLOPS["tpu-v6e"] == 918e12


def test_cpu_peak_is_measured_and_used_by_the_meter():
    import jax

    peak = mfu.measured_cpu_peak()
    # Any real CPU does more than 1 GFLOP/s and less than 100 TFLOP/s in a bf16 matmul.
    assert 1e9 < peak < 1e14
    total, label = mfu.peak_flops(jax.devices("cpu"))
    assert (total, label) == (peak, "cpu-measured")
    meter = mfu.MFUMeter(TINY, 8, devices=jax.devices("cpu"))
    m = meter.metrics(step_seconds=0.5, tokens=1000)
    assert m["tokens_per_second"] == 2000.0
    assert m["mfu"] == pytest.approx(2352 * 2000.0 / peak)
    n = len(jax.devices("cpu"))
    assert m["tflops_per_device"] == pytest.approx(2352 * 2000.0 / n / 1e12)
