"""`tools/aot_memory.py` end to end on a small config (the same path as the 7B recipes), and
the recipe table: every recipe is a valid mesh / batch / model combination and an SFT preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmat_jax.model.lora import LoRAConfig
from cmat_jax.sharding import MeshConfig, validate
from cmat_jax.train import SFTJob, load_presets
from cmat_jax.weights.registry import PRESETS as MODEL_PRESETS

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "aot_memory.py"


def _recipes():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import aot_memory
    finally:
        sys.path.remove(str(TOOL.parent))
    return aot_memory.load_recipes()


def test_small_config_compiles_both_steps_and_prints_json():
    # TinyLlama's widths (vocab 32000, hidden 2048) with 2 layers, seq 256, 2 rows per device.
    args = ["--config", "tinyllama-1.1b-v5e-8", "--layers", "2", "--seq-len", "256"]
    args += ["--batch-size", "16", "--accum-steps", "1"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), *args],
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["backend_compiled"] == "cpu"
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["num_layers"] == 2 and report["seq_len"] == 256
    assert report["micro_rows_per_device"] == 2
    assert report["attention_impl_compiled"] == "chunked"

    # Frozen bf16 base of this model: embed + lm_head (2 x 32000 x 2048) + 2 layers.
    layer = 2048 * (2048 + 2 * 256) + 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048
    base_bytes = 2 * (2 * 32000 * 2048 + 2 * layer + 2048)
    for name in ("train", "cmat"):
        m = report[name]
        total = m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
        assert m["total_bytes"] == total > 0
        # Inputs are FSDP-sharded: one eighth of the base (+ LoRA state + batch), not all of it.
        assert base_bytes / 8 <= m["argument_bytes"] < base_bytes / 4
        # The train state is donated: its output buffers alias the inputs.
        assert m["alias_bytes"] > 0 and m["output_bytes"] - m["alias_bytes"] < 4096
    peak = max(report["train"]["total_bytes"], report["cmat"]["total_bytes"])
    assert report["peak_gib"] == round(peak / 1024**3, 3)
    assert report["fits"] and report["headroom_gib"] == pytest.approx(
        15.0 - peak / 1024**3, abs=1e-3
    )


def test_recipes_are_consistent_and_are_sft_presets():
    recipes = _recipes()
    names = set(recipes.RECIPES)
    for model in ("tinyllama-1.1b", "qwen2-1.5b", "llama2-7b", "codellama-7b"):
        for hw in ("v5e-8", "v5p-8", "h100x8"):
            assert f"{model}-{hw}" in names
    sft = load_presets(SFTJob)
    for name, r in recipes.RECIPES.items():
        assert r.seq_len == 4096 and r.lora_rank == 16 and r.remat in ("full", "dots_saveable")
        cfg = r.model_config()
        assert cfg.param_dtype == "bfloat16" and cfg.attention_impl == r.hw.attention_impl
        assert r.arch in MODEL_PRESETS
        mesh = MeshConfig(**vars(r.mesh))
        assert mesh.shape(r.hw.devices) == (1, r.hw.devices, 1)
        validate(cfg, mesh, r.batch_size, accum_steps=r.accum_steps)
        assert r.micro_rows_per_device * r.accum_steps * r.hw.devices == r.batch_size
        LoRAConfig(**vars(r.lora()))
        job = sft[name]
        assert (job.seq_len, job.batch_size, job.optim.accum_steps) == (
            r.seq_len,
            r.batch_size,
            r.accum_steps,
        )
        assert job.model.startswith(f"{r.arch}@") and job.mesh == r.mesh
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.get("llama2-70b-v5e-8")
    with pytest.raises(ValueError, match="accum_steps x devices"):
        recipes.replace(recipes.get("llama2-7b-v5e-8"), batch_size=36)
