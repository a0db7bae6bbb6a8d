"""Console-script entry points (`cmat-train`, `cmat-evaluate`, `cmat-chat`, `cmat-export`,
`cmat-sandbox`).

Each runs its tool's `main` through `run_cli`, exactly as `python -m cmat_jax.<tool>` does, so
user errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import importlib

from cmat_jax.cli import run_cli


def _run(tool: str) -> None:
    # Imported here so that `cmat-chat --help` does not import the training stack, and so the
    # module is the importable one (presets in configs/ import `cmat_jax.train` by name).
    main = importlib.import_module(f"cmat_jax.{tool}").main
    run_cli(main)  # the tools' return values are for callers in Python, not an exit status


def train() -> None:
    _run("train")


def evaluate() -> None:
    _run("evaluate")


def chat() -> None:
    _run("chat")


def export() -> None:
    _run("export")


def sandbox() -> None:
    from cmat_jax.envs.os_sandbox import main

    raise SystemExit(main())  # its exit status: 2 with one error line when no sandbox can run
