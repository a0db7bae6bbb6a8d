"""Errors raised by the attention kernels at their input boundary."""

from __future__ import annotations


class AttentionInputError(ValueError):
    """Inputs an attention implementation cannot take (shapes, dtypes, head_dim)."""


class UnsupportedAttentionError(AttentionInputError):
    """Valid inputs that one implementation / backend does not support (e.g. a head_dim)."""
