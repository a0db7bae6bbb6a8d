"""GGUF (llama.cpp) reader: HF-style config from the metadata, HF-named float32 tensors.

The file is memory-mapped by ``gguf.GGUFReader``; tensors are dequantized one at a time with
the vectorized numpy kernels below (block layouts from ggml's spec), reshaped to HF shape (GGUF lists dims innermost-first) and renamed to HF names.
llama.cpp's converter permutes the rows of q/k projections for llama-arch models (interleaved
-> rotate-half RoPE); that permutation is undone here so the model only ever sees HF layouts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from cmat_jax.weights.errors import WeightsError

Q = GGMLQuantizationType

# ---------------------------------------------------------------------------------------------
# Dequantization: each kernel maps raw blocks [n_blocks, type_size] uint8 -> [n_blocks, block].


def _f16_col(blocks_NB: np.ndarray, start: int) -> np.ndarray:
    """The little-endian f16 at byte ``start`` of every block, as an f32 column [N, 1]."""
    return np.ascontiguousarray(blocks_NB[:, start : start + 2]).view("<f2").astype(np.float32)


def _deq_q8_0(blocks_NB: np.ndarray) -> np.ndarray:
    # d: f16 | qs: int8[32]
    d_N1 = _f16_col(blocks_NB, 0)
    return d_N1 * blocks_NB[:, 2:].view(np.int8).astype(np.float32)


def _nibbles(qs_NH: np.ndarray) -> np.ndarray:
    """Low nibbles give the first half of the block, high nibbles the second half."""
    return np.concatenate([qs_NH & 0x0F, qs_NH >> 4], axis=1)


def _deq_q4_0(blocks_NB: np.ndarray) -> np.ndarray:
    # d: f16 | qs: uint8[16]; x = (q - 8) * d
    d_N1 = _f16_col(blocks_NB, 0)
    q_N32 = _nibbles(blocks_NB[:, 2:]).astype(np.int8) - 8
    return d_N1 * q_N32.astype(np.float32)


def _deq_q4_1(blocks_NB: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qs: uint8[16]; x = q * d + m
    d_N1, m_N1 = _f16_col(blocks_NB, 0), _f16_col(blocks_NB, 2)
    return d_N1 * _nibbles(blocks_NB[:, 4:]).astype(np.float32) + m_N1


def _deq_q4_k(blocks_NB: np.ndarray) -> np.ndarray:
    # d: f16 | dmin: f16 | scales: uint8[12] (8 six-bit scales + 8 six-bit mins) | qs: uint8[128]
    n = blocks_NB.shape[0]
    d_N1, dmin_N1 = _f16_col(blocks_NB, 0), _f16_col(blocks_NB, 2)
    s_N12 = blocks_NB[:, 4:16]
    sc_N8 = np.empty((n, 8), np.uint8)
    mn_N8 = np.empty((n, 8), np.uint8)
    sc_N8[:, :4] = s_N12[:, 0:4] & 63
    mn_N8[:, :4] = s_N12[:, 4:8] & 63
    sc_N8[:, 4:] = (s_N12[:, 8:12] & 0x0F) | ((s_N12[:, 0:4] >> 6) << 4)
    mn_N8[:, 4:] = (s_N12[:, 8:12] >> 4) | ((s_N12[:, 4:8] >> 6) << 4)
    # qs: 4 groups of 32 bytes; low nibbles -> sub-block 2g, high nibbles -> sub-block 2g+1.
    qs_N432 = blocks_NB[:, 16:].reshape(n, 4, 32)
    q_N832 = np.stack([qs_N432 & 0x0F, qs_N432 >> 4], axis=2).reshape(n, 8, 32)
    scale_N81 = (d_N1 * sc_N8)[:, :, None]
    offset_N81 = (dmin_N1 * mn_N8)[:, :, None]
    return (scale_N81 * q_N832 - offset_N81).reshape(n, 256)


def _deq_q6_k(blocks_NB: np.ndarray) -> np.ndarray:
    # ql: uint8[128] (low 4 bits) | qh: uint8[64] (high 2 bits) | scales: int8[16] | d: f16
    n = blocks_NB.shape[0]
    ql_N2232 = blocks_NB[:, 0:128].reshape(n, 2, 2, 32)  # [half, 32-byte group, l]
    qh_N232 = blocks_NB[:, 128:192].reshape(n, 2, 32)  # [half, l]
    sc_N2421 = blocks_NB[:, 192:208].view(np.int8).reshape(n, 2, 4, 2, 1).astype(np.float32)
    d_N1 = _f16_col(blocks_NB, 208)
    # Quarter j of a 128-value half: low nibble of group j%2 when j<2, high nibble when j>=2;
    # its high 2 bits are bits 2j..2j+1 of qh.
    low_N2432 = np.stack([ql_N2232 & 0x0F, ql_N2232 >> 4], axis=2).reshape(n, 2, 4, 32)
    shifts_4 = np.array([0, 2, 4, 6], np.uint8)
    high_N2432 = (qh_N232[:, :, None, :] >> shifts_4[None, None, :, None]) & 3
    q_N2432 = (low_N2432 | (high_N2432 << 4)).astype(np.int8) - 32
    # Each 16 values of a quarter share one int8 scale: scales[8*half + 2*j + l//16].
    q_N24216 = q_N2432.reshape(n, 2, 4, 2, 16).astype(np.float32)
    return (d_N1.reshape(n, 1, 1, 1, 1) * sc_N2421 * q_N24216).reshape(n, 256)


def _deq_bf16(blocks_NB: np.ndarray) -> np.ndarray:
    bits = blocks_NB.view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def _deq_f16(blocks_NB: np.ndarray) -> np.ndarray:
    return blocks_NB.view("<f2").astype(np.float32)


def _deq_f32(blocks_NB: np.ndarray) -> np.ndarray:
    return blocks_NB.view("<f4").astype(np.float32)


_DEQUANT: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q8_0: _deq_q8_0,
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q4_K: _deq_q4_k,
    Q.Q6_K: _deq_q6_k,
}
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_DEQUANT)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, n_elements: int) -> np.ndarray:
    """Raw tensor bytes (any shape, uint8 or the plain dtype) -> flat float32 [n_elements]."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw_u8 = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw_u8.size * block != n_elements * type_size:
        raise ValueError(f"{qtype.name}: {raw_u8.size} bytes do not hold {n_elements} values")
    blocks_NB = raw_u8.reshape(-1, type_size)
    return _DEQUANT[qtype](blocks_NB).reshape(n_elements)


# ---------------------------------------------------------------------------------------------
# Names, permutation, config.

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_ARCH_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation (per head: interleaved -> two halves).

    The converter does ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)``;
    the inverse reshapes with the two factors in the other order and swaps back.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    """A GGUF metadata field as a plain python value (str, int, float, bool or list)."""
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.BOOL:
        return bool(value)
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        # Shortest decimal that round-trips the f32 (1e-05, not 9.999999747378752e-06).
        return float(str(np.float32(value)))
    if (
        field.types
        and field.types[0] == GGUFValueType.ARRAY
        and field.types[-1] == (GGUFValueType.BOOL)
    ):
        return [bool(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    """A memory-mapped GGUF file seen through HF names, shapes and config keys."""

    path: Path
    reader: GGUFReader

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Raw metadata key -> python value (tokenizer arrays included; GGUF.* header skipped)."""
        return {
            k: _field_value(f) for k, f in self.reader.fields.items() if not k.startswith("GGUF.")
        }

    @property
    def arch(self) -> str:
        return self._scalar("general.architecture")

    def _scalar(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise WeightsError(f"{self.path}: missing metadata key {key!r}")
            return default
        return _field_value(field)

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        """An HF ``config.json``-style dict built from the GGUF metadata."""
        arch = self.arch
        a = lambda key, default=None: self._scalar(f"{arch}.{key}", default)
        n_head = int(a("attention.head_count"))
        tensors = {t.name: t for t in self.reader.tensors}
        if "token_embd.weight" not in tensors:
            raise WeightsError(f"{self.path}: no token_embd.weight tensor")
        cfg: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
            "model_type": _ARCH_MODEL_TYPE[arch],
            "vocab_size": int(tensors["token_embd.weight"].shape[1]),
            "hidden_size": int(a("embedding_length")),
            "intermediate_size": int(a("feed_forward_length")),
            "num_hidden_layers": int(a("block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
            "rope_theta": float(a("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(a("context_length")),
            "tie_word_embeddings": "output.weight" not in tensors,
            "hidden_act": "silu",
            "attention_bias": arch == "qwen2",
        }
        key_length = a("attention.key_length", -1)
        if key_length != -1:
            cfg["head_dim"] = int(key_length)
        scaling = a("rope.scaling.type", "none")
        if scaling != "none":
            cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(a("rope.scaling.factor"))}
            orig = a("rope.scaling.original_context_length", -1)
            if orig != -1:
                cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
        for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
            tok = self._scalar(f"tokenizer.ggml.{gguf_key}_token_id", -1)
            if tok != -1:
                cfg[hf_key] = int(tok)
        return cfg

    def names_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """HF name -> (HF shape, GGML type name), from the tensor infos only."""
        return {
            hf_name(t.name) or t.name: (
                tuple(int(d) for d in reversed(t.shape)),
                t.tensor_type.name,
            )
            for t in self.reader.tensors
        }

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, float32 array in HF shape)``, one tensor dequantized at a time."""
        cfg = self.hf_config
        permute_heads = {}
        if self.arch == "llama":
            permute_heads = {
                "attn_q": cfg["num_attention_heads"],
                "attn_k": cfg["num_key_value_heads"],
            }
        for t in self.reader.tensors:
            name = hf_name(t.name)
            assert name is not None  # checked in read_gguf
            shape = tuple(int(d) for d in reversed(t.shape))
            w = dequantize(t.data, t.tensor_type, int(t.n_elements)).reshape(shape)
            m = _BLOCK_RE.fullmatch(t.name)
            if m is not None and m.group(2) in permute_heads:
                w = unpermute_qk(w, permute_heads[m.group(2)])
            yield name, w


def read_gguf(path: Path | str) -> GGUFModel:
    """Open a GGUF file (memory-mapped) and validate arch, tensor names and tensor types."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise WeightsError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise WeightsError(f"{path}: unreadable GGUF file ({e})") from None
    model = GGUFModel(path, reader)
    arch = model.arch
    if arch not in _ARCH_MODEL_TYPE:
        raise WeightsError(
            f"{path}: architecture {arch!r} not supported (supported: {sorted(_ARCH_MODEL_TYPE)})"
        )
    for t in reader.tensors:
        if t.tensor_type not in _DEQUANT:
            raise WeightsError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, not supported "
                f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})"
            )
        if hf_name(t.name) is None:
            raise WeightsError(f"{path}: tensor {t.name!r} has no HF counterpart (not supported)")
    return model
