"""The custom_vjp shared by the Pallas flash kernels.

A kernel module supplies `forward(cfg, q, k, v, seg) -> (o, lse)` and
`backward(cfg, q, k, v, seg, o, lse, do) -> (dq, dk, dv)` in its own layout; the residuals
are the forward's inputs, its output and the logsumexp, so the backward recomputes the
probabilities tile by tile instead of storing them. `cfg` is static (hashable).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


def flash_with_vjp(forward: Callable, backward: Callable) -> Callable:
    """-> flash(cfg, q, k, v, seg) -> o, differentiable in q, k, v (seg is integer ids)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash(cfg, q, k, v, seg):
        return forward(cfg, q, k, v, seg)[0]

    def flash_fwd(cfg, q, k, v, seg):
        o, lse = forward(cfg, q, k, v, seg)
        return o, (q, k, v, seg, o, lse)

    def flash_bwd(cfg, res, do):
        q, k, v, seg, o, lse = res
        dq, dk, dv = backward(cfg, q, k, v, seg, o, lse, do)
        return dq, dk, dv, None

    flash.defvjp(flash_fwd, flash_bwd)
    return flash
