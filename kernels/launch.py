"""How the GPU kernels are launched: `pl.pallas_call` pinned to the Triton backend.

JAX's default Pallas GPU backend is Mosaic GPU, which rejects kernels written for Triton
(warpgroup-sized copies, its own shared-memory plan), so every GPU kernel passes Triton
compiler params explicitly. `interpret=None` resolves per lowering platform: interpreted when
the program is lowered for CPU, compiled by Triton for CUDA / ROCm, so one traced program
lowers for any of them (`jit(f).trace(...).lower(lowering_platforms=("cuda",))` on a CPU
host gives the Triton kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# 4 warps and a 2-stage pipeline: the usual choice for 64 x 64 x 128 bf16 flash tiles; the
# shared-memory budget this implies is worked out in docs/kernels.md.
TRITON_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def triton_call(kernel: Callable, *, interpret: bool | None, **pallas_kw: Any) -> Callable:
    """`pl.pallas_call(kernel, **pallas_kw)` for the Triton backend (see the module doc)."""

    def call(interp: bool) -> Callable:
        return pl.pallas_call(kernel, interpret=interp, compiler_params=TRITON_PARAMS, **pallas_kw)

    if interpret is not None:
        return call(bool(interpret))
    interpreted, compiled = call(True), call(False)
    return lambda *args: jax.lax.platform_dependent(*args, cpu=interpreted, default=compiled)
