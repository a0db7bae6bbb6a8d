"""cmat_jax: CMAT multi-agent tuning of small LLMs in JAX."""

from typing import Any


def load_model(source: Any, dtype: str = "float32", **kwargs: Any):
    """`(model, tokenizer)` from an HF directory, a `.gguf` file or a preset name."""
    from cmat_jax.weights.load import load_model as _load

    return _load(source, dtype, **kwargs)


__all__ = ["load_model"]
