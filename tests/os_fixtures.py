"""Shared set-up of the OS-task tests: the cached sandbox image, built through the same code as
``python -m cmat_jax.sandbox setup`` when missing (a failure to build or isolate fails
the test with the sandbox's own error: never skipped, never run unsandboxed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmat_jax.envs.os_sandbox import ensure_rootfs

OS_DATA = Path(__file__).parent / "data" / "agentbench_os"
OS_DEV = OS_DATA / "dev.json"
OS_SCRIPTS = OS_DATA / "scripts" / "dev"


@pytest.fixture(scope="session")
def os_image() -> str:
    ensure_rootfs("default", log=print)
    return "default"
