"""Inference: the jitted prefill/decode generator, sampling, stop strings and the prefix cache."""
