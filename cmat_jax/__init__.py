"""cmat_jax: CMAT multi-agent tuning of small LLMs in JAX."""
