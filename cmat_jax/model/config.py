"""One frozen config for the Llama family (llama, mistral, qwen2) and its HF `config.json` parser."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from cmat_jax.textfile import read_json

MODEL_TYPES = ("llama", "mistral", "qwen2")
# cmat_jax.model.attention.IMPLS (kept here so the config imports no kernels; a test checks).
ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "chunked", "auto")


class ConfigError(ValueError):
    """A model config that we cannot honour exactly; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `linear` divides positions; `llama3` rescales low frequencies."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    model_type: str = "llama"
    # Storage dtype of the (frozen) weights and dtype of matmul inputs; accumulation is f32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_impl: str = "xla"
    # Rematerialize each layer in the backward pass ("none" | "full" | "dots_saveable").
    remat: str = "none"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config field {name!r} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.remat not in ("none", "full", "dots_saveable"):
            raise ConfigError(f"remat must be none|full|dots_saveable, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        D, F, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = D * (self.q_dim + 2 * self.kv_dim) + self.q_dim * D + 3 * D * F + 2 * D
        head = 0 if self.tie_embeddings else D * self.vocab_size
        return self.vocab_size * D + L * per_layer + D + head

    @classmethod
    def from_hf(
        cls, source: str | Path | dict[str, Any], *, where: str | None = None, **overrides: Any
    ) -> ModelConfig:
        """Parse an HF `config.json` (path, directory or dict); transformers 4.x and 5.x spellings.

        `where` names the origin of a dict in error messages.
        """
        if isinstance(source, dict):
            raw, where = dict(source), where or "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            raw = read_json(path, ConfigError)
            where = str(path)
        return cls(**{**_parse_hf(raw, where), **overrides})


# Fields that carry no information for the forward pass (bookkeeping, generation defaults).
_IGNORED = {
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "initializer_range",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tie_encoder_decoder",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "auto_map",
    "quantization_config_ignored",
    "max_window_layers",
    "layer_types",
    "use_sliding_window",
    "sliding_window",
    "attention_dropout",
    "hidden_act",
    "mlp_bias",
    "pretraining_tp",
    "attention_bias",
    "rope_scaling",
    "rope_parameters",
    "rope_theta",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
}


def _parse_hf(raw: dict[str, Any], where: str) -> dict[str, Any]:
    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: field {field!r} {why}")

    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise bad("model_type", f"is {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    unknown = sorted(k for k in raw if k not in _IGNORED)
    if unknown:
        raise bad(unknown[0], "is not supported by this implementation (it would be ignored)")
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if field not in raw:
            raise bad(field, "is missing")
    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", f"is {raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if raw.get("mlp_bias"):
        raise bad("mlp_bias", "is true; MLP biases are not supported")
    if raw.get("attention_dropout", 0.0):
        raise bad("attention_dropout", "must be 0")
    if raw.get("pretraining_tp", 1) != 1:
        raise bad("pretraining_tp", "must be 1")

    sliding = raw.get("sliding_window")
    if model_type == "qwen2":
        if raw.get("use_sliding_window"):
            raise bad("use_sliding_window", "is true; sliding-window attention is not supported")
        sliding = None
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise bad("layer_types", "contains non-full attention layers")

    heads = raw["num_attention_heads"]
    rope_theta, scaling = _parse_rope(raw, bad)
    attention_bias = bool(raw.get("attention_bias", False))
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; llama's `attention_bias` adds them to q/k/v/o.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        sliding_window=sliding,
        model_type=model_type,
    )


def _parse_rope(raw: dict[str, Any], bad: Any) -> tuple[float, RopeScaling | None]:
    # transformers 5.x: `rope_parameters` holds theta and the scaling; 4.x: `rope_theta` +
    # `rope_scaling` (with either `type` or `rope_type`).
    params = raw.get("rope_parameters") or {}
    field = "rope_parameters"
    if not params and raw.get("rope_scaling"):
        params, field = raw["rope_scaling"], "rope_scaling"
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    factor = params.get("factor")
    if factor is None:
        raise bad(f"{field}.factor", "is missing")
    if kind == "linear":
        return theta, RopeScaling("linear", float(factor))
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                "llama3",
                float(factor),
                float(params["low_freq_factor"]),
                float(params["high_freq_factor"]),
                int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise bad(f"{field}.{e.args[0]}", "is missing") from None
    raise bad(f"{field}.rope_type", f"is {kind!r}; supported: default, linear, llama3")
