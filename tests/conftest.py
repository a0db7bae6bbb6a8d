"""Suite-wide fixtures."""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled XLA program after each test module.

    Each XLA:CPU executable keeps its own memory mappings, and the suite runs in one process:
    at 12f64bd it peaked at 58,190 mappings against Linux's default `vm.max_map_count` of
    65,530. Past the limit LLVM cannot map the next program's code and the process dies inside
    an XLA compile (seen as a segfault in whatever test compiled next, 0961e5e). With this,
    the count stays near what one module needs."""
    yield
    jax.clear_caches()
    gc.collect()
