"""Does a recipe fit? Compile its LoRA train step and CMAT step ahead of time, no weights.

    python tools/aot_memory.py --config llama2-7b-v5e-8

Builds the recipe's mesh over fake CPU devices (`--xla_force_host_platform_device_count`, set
here before JAX starts), abstract inputs (`jax.ShapeDtypeStruct` with the NamedShardings the real
run uses; the model comes from `jax.eval_shape`, so nothing is allocated), lowers and compiles
both jitted steps for that mesh and prints XLA's per-device memory analysis as one JSON line:
argument (params, optimizer state, frozen base, batch), output, aliased (donated state), temp
(activations, gathered weights, workspace) and their total, against the hardware's budget.

This is the CPU compiler's memory plan for the same SPMD-partitioned program. XLA:CPU and the
TPU/GPU compilers partition the same way (same shardings, same collectives, same per-device
shapes) and the layer scan + remat bound what lives across the backward pass, so the numbers
approximate the accelerator footprint; they differ in fusion and scheduling details. The
flash-attention kernels a TPU/GPU run uses (`pallas`) cannot be compiled for CPU: the compile
uses `chunked`, the pure-JAX blockwise attention with the same O(T) memory and the same saved
residuals (output + log-sum-exp). Small configs for tests: `--layers`, `--seq-len`,
`--batch-size`, `--accum-steps` override the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/aot_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="recipe name from configs/recipes.py")
    p.add_argument("--steps", choices=("both", "train", "cmat"), default="both")
    p.add_argument("--attention-impl", default="chunked", help="impl compiled on CPU")
    p.add_argument("--layers", type=int, help="override the number of layers (small tests)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--accum-steps", type=int)
    p.add_argument("--remat", choices=("none", "full", "dots_saveable"))
    p.add_argument("--host-devices", type=int, default=8, help="fake CPU devices to create")
    return p


def _force_host_devices(n: int) -> None:
    """Fake CPU devices; only effective before JAX initializes its backends."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load_recipes() -> Any:
    import importlib.util

    from cmat_jax.train import configs_dir

    path = configs_dir() / "recipes.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    spec = importlib.util.spec_from_file_location("_cmat_jax_recipes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "code_bytes": int(m.generated_code_size_in_bytes),
    }
    # Live at peak: inputs + outputs (minus donated buffers reused as outputs) + temporaries.
    total = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["total_bytes"] = total
    out["total_gib"] = round(total / GIB, 3)
    return out


def abstract_state(cfg: Any, lora_cfg: Any, optimizer: Any) -> tuple[Any, Any, Any]:
    """(graphdef, frozen, TrainState) as ShapeDtypeStructs: traced, never allocated."""
    import jax
    from flax import nnx

    from cmat_jax.model.llama import Llama
    from cmat_jax.model.lora import LoRAParam
    from cmat_jax.training.step import init_train_state

    def build() -> Any:
        model = Llama(cfg, rngs=nnx.Rngs(0))
        model.add_lora(lora_cfg, rngs=nnx.Rngs(1))
        return model

    graphdef, _, _ = nnx.split(nnx.eval_shape(build), LoRAParam, ...)

    def init() -> tuple[Any, Any]:
        _, frozen, state = init_train_state(build(), optimizer, 0, base_dtype=cfg.param_dtype)
        return frozen, state

    frozen, state = jax.eval_shape(init)
    return graphdef, frozen, state


def abstract_batch(rows: int, seq: int, *, cmat: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    tok = lambda: jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    batch = {
        "inputs": tok(),
        "targets": tok(),
        "loss_mask": tok(),
        "segment_ids": tok(),
        "positions": tok(),
        "adapter_ids": jax.ShapeDtypeStruct((rows,), jnp.int32),
    }
    if cmat:
        f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        batch.update(
            loss_mask=jax.ShapeDtypeStruct((rows, seq), jnp.bool_),
            advantage=f32((rows, seq)),
            behavior_logp=f32((rows, seq)),
            ref_logp=f32((rows, seq)),
            weight=f32((rows,)),
            anchor=jax.ShapeDtypeStruct((rows,), jnp.bool_),
        )
    return batch


def compile_step(step: Any, state: Any, frozen: Any, batch: dict[str, Any]) -> tuple[Any, float]:
    """Lower + compile `step` (a TrainStep) for its mesh on abstract inputs."""
    import jax

    shardings = step.shardings(state, frozen, batch)
    args = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        (state, frozen, batch),
        shardings,
    )
    jitted = step._compile(state, frozen, batch)
    t0 = time.perf_counter()
    with jax.set_mesh(step.mesh):
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def run(ns: argparse.Namespace) -> dict[str, Any]:
    import jax

    from cmat_jax import sharding as shd
    from cmat_jax.cmat.loss import CMATLoss, LossConfig
    from cmat_jax.training.step import make_optimizer, make_train_step

    recipes = load_recipes()
    recipe = recipes.get(ns.config)
    changes = {
        k: v
        for k, v in dict(
            seq_len=ns.seq_len,
            batch_size=ns.batch_size,
            accum_steps=ns.accum_steps,
            remat=ns.remat,
        ).items()
        if v is not None
    }
    recipe = recipes.replace(recipe, **changes)
    hw = recipe.hw
    if jax.device_count() < hw.devices:
        raise ValueError(
            f"--config {recipe.name}: needs {hw.devices} devices, JAX has {jax.device_count()} "
            "(run this tool as a script so it can create fake CPU devices before JAX starts)"
        )
    overrides: dict[str, Any] = {"attention_impl": ns.attention_impl}
    if ns.layers:
        overrides["num_layers"] = ns.layers
    cfg = recipe.model_config(**overrides)
    lora_cfg = recipe.lora().build()
    mesh_cfg = recipe.mesh.build()
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[: hw.devices])
    shd.validate(cfg, mesh, recipe.batch_size, accum_steps=recipe.accum_steps)

    optimizer = make_optimizer(recipes.OptimArgs(accum_steps=recipe.accum_steps).build(), 1000)
    graphdef, frozen, state = abstract_state(cfg, lora_cfg, optimizer)
    report: dict[str, Any] = {
        "config": recipe.name,
        "hardware": hw.name,
        "devices": hw.devices,
        "mesh": dict(zip(shd.MESH_AXES, mesh_cfg.shape(hw.devices), strict=True)),
        "num_layers": cfg.num_layers,
        "seq_len": recipe.seq_len,
        "batch_size": recipe.batch_size,
        "accum_steps": recipe.accum_steps,
        "micro_rows_per_device": recipe.micro_rows_per_device,
        "remat": cfg.remat,
        "lora_rank": lora_cfg.rank,
        "attention_impl_run": hw.attention_impl,
        "attention_impl_compiled": cfg.attention_impl,
        "backend_compiled": jax.default_backend(),
    }
    steps = {}
    if ns.steps in ("both", "train"):
        steps["train"] = (
            make_train_step(graphdef, optimizer, mesh, recipe.accum_steps),
            abstract_batch(recipe.batch_size, recipe.seq_len, cmat=False),
        )
    if ns.steps in ("both", "cmat"):
        loss_cfg = LossConfig(mode="ppo", kl_coef=0.05, anchor_coef=0.1)
        steps["cmat"] = (
            make_train_step(graphdef, optimizer, mesh, recipe.accum_steps, loss=CMATLoss(loss_cfg)),
            abstract_batch(recipe.batch_size, recipe.seq_len, cmat=True),
        )
    for name, (step, batch) in steps.items():
        compiled, seconds = compile_step(step, state, frozen, batch)
        report[name] = {**_memory(compiled), "compile_s": round(seconds, 1)}
    peak = max(report[n]["total_bytes"] for n in steps)
    report["peak_gib"] = round(peak / GIB, 3)
    report["budget_gib"] = hw.budget_gib
    report["hbm_gib"] = hw.hbm_gib
    report["headroom_gib"] = round(hw.budget_gib - peak / GIB, 3)
    report["fits"] = peak <= hw.budget_gib * GIB
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ns = _parser().parse_args(argv)
    if "jax" not in sys.modules:
        _force_host_devices(ns.host_devices)
    sys.path.insert(0, str(ROOT))
    report = run(ns)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from cmat_jax.cli import run_cli

    run_cli(main)
