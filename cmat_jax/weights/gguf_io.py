"""GGUF (llama.cpp) reader: HF-style config from the metadata, HF-named float32 tensors by slice.

The file is memory-mapped by ``gguf.GGUFReader``. ``GGUFModel.read(name, index)`` dequantizes
only the rows and quant blocks a slice covers, with ``gguf.quants`` (every type it supports),
and returns it in HF shape (GGUF lists dims innermost-first) under its HF name, so a sharded
load dequantizes each device's part of each tensor and never the whole model at once.
llama.cpp's converter permutes the rows of q/k projections for llama-arch models (interleaved
-> rotate-half RoPE); that permutation is undone here so the model only ever sees HF layouts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, quants
from gguf.gguf_reader import ReaderTensor

from cmat_jax.weights.errors import WeightsError


@functools.cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants`` can dequantize ``qtype`` (asked of the library, one zero block)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _read_block_range(t: ReaderTensor, outer: tuple[slice, ...], cols: slice) -> np.ndarray:
    """Float32 values of ``t`` (HF shape) at ``outer`` x ``cols``: only the quant blocks that
    hold ``cols`` in the selected rows are copied out of the memory map and dequantized."""
    block, type_size = GGML_QUANT_SIZES[t.tensor_type]
    n_cols = int(t.shape[0])
    rows_shape = tuple(int(d) for d in reversed(t.shape[1:]))
    raw = t.data.view(np.uint8).reshape(*rows_shape, -1)  # [..., bytes of one innermost row]
    c0, c1, _ = cols.indices(n_cols)
    b0, b1 = c0 // block, -(-c1 // block)
    raw_sel = np.ascontiguousarray(raw[(*outer, slice(b0 * type_size, b1 * type_size))])
    values = quants.dequantize(raw_sel, t.tensor_type)
    return np.asarray(values[..., c0 - b0 * block : c1 - b0 * block], np.float32)


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

    @cached_property
    def _by_hf_name(self) -> dict[str, ReaderTensor]:
        return {hf_name(t.name) or t.name: t for t in self.reader.tensors}

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> HF shape, from the tensor infos only."""
        return {n: tuple(int(d) for d in reversed(t.shape)) for n, t in self._by_hf_name.items()}

    @cached_property
    def qtypes(self) -> dict[str, str]:
        """HF name -> GGML type name (``Q4_K``, ``F32``, ...)."""
        return {n: t.tensor_type.name for n, t in self._by_hf_name.items()}

    @cached_property
    def _permute_heads(self) -> dict[str, int]:
        """GGUF block tensor kind -> head count, for the q/k rows llama.cpp permuted."""
        if self.arch != "llama":
            return {}
        cfg = self.hf_config
        return {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """Float32 slice ``index`` (HF layout; ``()`` = whole tensor) of HF tensor ``name``."""
        t = self._by_hf_name[name]
        shape = self.shapes[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if any(s.step not in (None, 1) for s in index):
            raise ValueError(f"{name}: strided slices are not supported ({index})")
        m = _BLOCK_RE.fullmatch(t.name)
        n_head = self._permute_heads.get(m.group(2), 0) if m else 0
        if not n_head:
            return _read_block_range(t, index[:-1], index[-1])
        # Stored rows are permuted within each head: read whole heads, unpermute, cut.
        head_rows = shape[0] // n_head
        r0, r1, _ = index[0].indices(shape[0])
        h0, h1 = r0 // head_rows, -(-r1 // head_rows)
        rows = slice(h0 * head_rows, h1 * head_rows)
        if len(shape) == 1:
            heads = _read_block_range(t, (), rows)
        else:
            heads = _read_block_range(t, (rows, *index[1:-1]), index[-1])
        w = unpermute_qk(heads, h1 - h0)
        return w[r0 - h0 * head_rows : r1 - h0 * head_rows]


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
        if not dequantizable(t.tensor_type):
            raise WeightsError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf.quants "
                "cannot dequantize (not supported)"
            )
        if hf_name(t.name) is None:
            raise WeightsError(f"{path}: tensor {t.name!r} has no HF counterpart (not supported)")
    return model
