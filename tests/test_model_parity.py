"""Our decoder vs HF transformers (torch, CPU, float32) on random-init checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmat_jax import load_model
from tests.fixtures_hf import save_tiny_model_dir

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-llama3rope-headdim": (
        "llama",
        {"head_dim": 24, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 50000.0}},
    ),
    "llama-linear-rope-bias": (
        "llama",
        {
            "attention_bias": True,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
    ),
    "mistral-gqa": ("mistral", {"head_dim": 32}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    import transformers

    model_type, overrides = CASES[case]
    path = save_tiny_model_dir(tmp_path / case, model_type, **overrides)
    ours, _ = load_model(path, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    rng = np.random.default_rng(0)
    for T in (1, 13, 67):  # odd lengths, past the llama3 original context of 64
        ids = rng.integers(0, 320, size=(2, T))
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        got = np.asarray(ours(ids))
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= tol, (case, T, np.abs(got - ref).max())


def test_sharded_checkpoint_and_segments(tmp_path):
    """A sharded safetensors checkpoint loads; packed segments equal separate sequences."""
    import transformers

    path = save_tiny_model_dir(tmp_path / "m", "llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for f in path.glob("tokenizer*"):
        (tmp_path / "sharded" / f.name).write_bytes(f.read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours, _ = load_model(tmp_path / "sharded")

    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 320, 9), rng.integers(0, 320, 6)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 9 + [2] * 6])
    pos = np.array([list(range(9)) + list(range(6))])
    got = np.asarray(ours(packed, positions_BT=pos, segment_ids_BT=seg))[0]
    np.testing.assert_allclose(got[:9], np.asarray(ours(a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(got[9:], np.asarray(ours(b[None]))[0], atol=1e-5)


def test_bf16_compute_close_to_f32(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m", "llama")
    f32, _ = load_model(path, dtype="float32")
    bf16, _ = load_model(path, dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, 320, (2, 20))
    a, b = np.asarray(f32(ids)), np.asarray(bf16(ids))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
