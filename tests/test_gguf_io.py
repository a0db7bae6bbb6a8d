"""GGUF reader: HF round trip over many quant types, slices, real SmolLM2 file, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, RopeScalingType, quants

from cmat_jax.weights.errors import WeightsError
from cmat_jax.weights.gguf_io import read_gguf
from cmat_jax.weights.registry import smollm2_gguf_path

Q = GGMLQuantizationType
RAW_ONLY = (Q.Q4_K, Q.Q6_K)  # the gguf package only dequantizes these: build raw blocks


def _raw_k_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q4_K / Q6_K rows [rows, bytes] with finite, small f16 super-block scales."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    blocks = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    d = (rng.standard_normal((n, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin at the start
        blocks[:, 0:4] = d.reshape(n, 4)
    else:  # Q6_K: d at the end
        blocks[:, type_size - 2 :] = d.reshape(n, 4)[:, :2]
    return blocks.reshape(rows, cols // block * type_size)


def _hf_to_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows (rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# --- a small llama GGUF written from a random HF state dict ---------------------------------

H, N_HEAD, N_KV, INTER, VOCAB, LAYERS = 256, 4, 2, 512, 64, 2
# Tensor type per HF name suffix and layer: covers every supported type at least once.
LAYER_TYPES = [
    {
        "q": Q.F32,
        "k": Q.F16,
        "v": Q.BF16,
        "o": Q.Q4_0,
        "gate": Q.Q4_1,
        "up": Q.Q4_K,
        "down": Q.Q6_K,
    },
    {
        "q": Q.Q4_K,
        "k": Q.Q6_K,
        "v": Q.Q8_0,
        "o": Q.Q5_0,
        "gate": Q.Q5_1,
        "up": Q.Q4_0,
        "down": Q.Q4_1,
    },
]
GGUF_SUFFIX = {
    "q": ("attn_q", "self_attn.q_proj"),
    "k": ("attn_k", "self_attn.k_proj"),
    "v": ("attn_v", "self_attn.v_proj"),
    "o": ("attn_output", "self_attn.o_proj"),
    "gate": ("ffn_gate", "mlp.gate_proj"),
    "up": ("ffn_up", "mlp.up_proj"),
    "down": ("ffn_down", "mlp.down_proj"),
}


def _shape(key: str) -> tuple[int, int]:
    head_dim = H // N_HEAD
    return {
        "q": (H, H),
        "k": (N_KV * head_dim, H),
        "v": (N_KV * head_dim, H),
        "o": (H, H),
        "gate": (INTER, H),
        "up": (INTER, H),
        "down": (H, INTER),
    }[key]


def _encode(w_hf: np.ndarray, qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """HF-shaped f32 tensor -> what the GGUF stores (plain array or raw quantized rows)."""
    if qtype in RAW_ONLY:
        return _raw_k_blocks(qtype, *w_hf.shape, seed=seed)
    if qtype == Q.F32:
        return w_hf
    if qtype == Q.F16:
        return w_hf.astype(np.float16)
    return quants.quantize(w_hf, qtype)


def _write_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """Write the GGUF; return the HF tensors a correct reader must give back (float32)."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_key_length(H // N_HEAD)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_bos_token_id(5)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, w_hf: np.ndarray, qtype: GGMLQuantizationType, heads=0):
        stored = _hf_to_gguf_permute(w_hf, heads) if heads else w_hf
        data = _encode(stored, qtype, seed=len(expected))
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        # Ground truth: the exact values the file holds, mapped back by the inverse of `stored`.
        if qtype == Q.F32:
            back = w_hf
        else:
            held = quants.dequantize(data, qtype).astype(np.float32).reshape(w_hf.shape)
            back = held
            if heads:  # inverse permutation, written independently of the reader
                hd = w_hf.shape[0] // heads
                back = held.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w_hf.shape)
            if qtype not in RAW_ONLY and qtype != Q.F16:
                assert np.abs(back - w_hf).max() < 0.5  # quantized, but still the same tensor
            if qtype == Q.F16:
                np.testing.assert_array_equal(back, w_hf.astype(np.float16).astype(np.float32))
        expected[hf_name] = back

    add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((VOCAB, H)), Q.Q8_0)
    for i, types in enumerate(LAYER_TYPES):
        for key, qtype in types.items():
            g, h = GGUF_SUFFIX[key]
            heads = {"q": N_HEAD, "k": N_KV}.get(key, 0)
            w = rng.standard_normal(_shape(key)).astype(np.float32)
            add(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", w, qtype, heads)
        for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            w = rng.standard_normal(H).astype(np.float32)
            add(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", w, Q.F32)
    add("output_norm.weight", "model.norm.weight", rng.standard_normal(H).astype(np.float32), Q.F32)
    add(
        "output.weight", "lm_head.weight", rng.standard_normal((VOCAB, H)).astype(np.float32), Q.F32
    )

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_llama_gguf_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = _write_llama_gguf(path)
    model = read_gguf(path)
    got = {name: model.read(name) for name in model.shapes}
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)

    cfg = model.hf_config
    assert cfg["model_type"] == "llama"
    assert cfg["attention_bias"] is False
    assert cfg["vocab_size"] == VOCAB
    assert cfg["hidden_size"] == H
    assert cfg["intermediate_size"] == INTER
    assert cfg["num_hidden_layers"] == LAYERS
    assert cfg["num_attention_heads"] == N_HEAD
    assert cfg["num_key_value_heads"] == N_KV
    assert cfg["head_dim"] == H // N_HEAD
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 512
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert cfg["bos_token_id"] == 5
    assert model.metadata["general.architecture"] == "llama"
    assert model.shapes["model.layers.1.self_attn.k_proj.weight"] == (128, H)
    assert model.qtypes["model.layers.1.self_attn.k_proj.weight"] == "Q6_K"


def test_slices_equal_the_whole_tensor_sliced(tmp_path: Path) -> None:
    """Slices read only their rows and quant blocks, also across q/k heads (permuted rows)."""
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path)
    model = read_gguf(path)
    cuts = [
        (slice(0, 64), slice(0, 256)),  # one q head, all columns
        (slice(16, 112), slice(32, 96)),  # rows across heads, columns inside one 256-block
        (slice(128, 256), slice(128, 256)),  # an fsdp/tensor shard: half the rows and columns
        (slice(5, 6), slice(255, 256)),  # a single value at a block's end
    ]
    for name in model.shapes:
        whole = model.read(name)
        for cut in cuts:
            cut = cut[: whole.ndim]
            if any(s.stop > d for s, d in zip(cut, whole.shape, strict=True)):
                continue
            np.testing.assert_array_equal(model.read(name, cut), whole[cut], err_msg=f"{name}{cut}")


def test_qwen2_gguf_keeps_rows_and_biases(tmp_path: Path) -> None:
    """qwen2 arch: no q/k permutation, q/k/v biases, tied embeddings when output is absent."""
    rng = np.random.default_rng(1)
    path = tmp_path / "qwen.gguf"
    writer = GGUFWriter(path, "qwen2")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    tensors = {
        "token_embd.weight": rng.standard_normal((32, 64)),
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)),
        "blk.0.attn_q.bias": rng.standard_normal(64),
        "blk.0.attn_k.weight": rng.standard_normal((32, 64)),
        "blk.0.attn_k.bias": rng.standard_normal(32),
        "output_norm.weight": rng.standard_normal(64),
    }
    for name, w in tensors.items():
        writer.add_tensor(name, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    model = read_gguf(path)
    got = {name: model.read(name) for name in model.shapes}
    np.testing.assert_array_equal(
        got["model.layers.0.self_attn.q_proj.weight"], tensors["blk.0.attn_q.weight"].astype("f4")
    )
    np.testing.assert_array_equal(
        got["model.layers.0.self_attn.k_proj.bias"], tensors["blk.0.attn_k.bias"].astype("f4")
    )
    cfg = model.hf_config
    assert (cfg["model_type"], cfg["attention_bias"], cfg["tie_word_embeddings"]) == (
        "qwen2",
        True,
        True,
    )
    assert cfg["rope_theta"] == 10000.0 and "head_dim" not in cfg and "rope_scaling" not in cfg


def _write_one_tensor_gguf(path: Path, name: str, qtype: GGMLQuantizationType) -> None:
    writer = GGUFWriter(path, "llama")
    for add, v in ((writer.add_block_count, 1), (writer.add_embedding_length, 64)):
        add(v)
    block, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    try:
        raw = quants.quantize(rng.standard_normal((4, 256)).astype(np.float32), qtype)
    except NotImplementedError:  # a type gguf cannot write: random blocks are enough here
        raw = rng.integers(0, 256, (4, 256 // block * type_size), dtype=np.uint8)
    writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_quant_type(tmp_path: Path) -> None:
    path = tmp_path / "q8k.gguf"
    _write_one_tensor_gguf(path, "blk.0.ffn_up.weight", Q.Q8_K)  # gguf.quants has no Q8_K
    with pytest.raises(
        WeightsError, match=r"q8k\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type Q8_K"
    ):
        read_gguf(path)


def test_unknown_tensor_name_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    _write_one_tensor_gguf(path, "rope_freqs.weight", Q.Q8_0)
    with pytest.raises(WeightsError, match=r"odd\.gguf: tensor 'rope_freqs\.weight' has no HF"):
        read_gguf(path)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=r"model\.gguf: not a GGUF file"):
        read_gguf(not_gguf)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(WeightsError, match=r"cut\.gguf: unreadable GGUF"):
        read_gguf(truncated)
    with pytest.raises(WeightsError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


# --- the real SmolLM2-135M-Instruct GGUF ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(smollm2_gguf_path())


def test_smollm2_config(smollm2) -> None:
    cfg = smollm2.hf_config
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152
    assert smollm2.metadata["tokenizer.ggml.model"] == "gpt2"


def test_smollm2_tensors(smollm2) -> None:
    shapes = {
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
    }
    want = {f"model.layers.{i}.{k}": s for i in range(30) for k, s in shapes.items()}
    want |= {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    assert smollm2.shapes == want

    by_gguf = {t.name: t for t in smollm2.reader.tensors}
    got = {}
    for name in smollm2.shapes:
        w = smollm2.read(name)
        assert w.dtype == np.float32 and w.shape == want[name] and np.isfinite(w).all(), name
        if name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight"):
            got[name] = w
    assert len(got) == 2
    emb = by_gguf["token_embd.weight"]
    np.testing.assert_array_equal(
        got["model.embed_tokens.weight"], quants.dequantize(emb.data, emb.tensor_type)
    )
    q = by_gguf["blk.7.attn_q.weight"]
    ref_q = quants.dequantize(q.data, q.tensor_type)  # as stored: llama.cpp's row order
    np.testing.assert_array_equal(
        _hf_to_gguf_permute(got["model.layers.7.self_attn.q_proj.weight"], 9), ref_q
    )
