"""A tiny training run directory (config.json + orbax checkpoints of LoRA params), as
`cmat_jax.train` and the CMAT job write them, without training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple


def save_tiny_run_dir(
    root: Path, model_dir: Path, slots: tuple[str, ...], slot: str | None
) -> dict[str, Any]:
    """config.json naming the base and the LoRA config; checkpoints at steps 3 (stage
    agent_tuning, params negated) and 7 (stage cmat) of random LoRA params; returns step 7's."""
    import jax
    import numpy as np
    from flax import nnx

    from cmat_jax import load_model
    from cmat_jax.model.lora import LoRAParam
    from cmat_jax.train import LoRAArgs
    from cmat_jax.training.checkpoint import CheckpointConfig, Checkpointer

    lora = LoRAArgs(rank=2, alpha=4.0, slots=slots)
    cfg: dict[str, Any] = {"model": str(model_dir), "lora": dataclasses.asdict(lora)}
    if slot:
        cfg["slot"] = slot
        cfg.update(ltm_k=2, ltm_token_budget=64, ltm_solutions=False, ltm_similar=False)
    root.mkdir()
    (root / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(model_dir, "float32")
    model.add_lora(lora.build(), rngs=nnx.Rngs(1))
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), lora_state.to_pure_dict()
    )

    class State(NamedTuple):
        step: Any
        params: Any

    with Checkpointer(root / "checkpoints", CheckpointConfig(every=1)) as ck:
        negated = jax.tree.map(lambda x: -x, params)  # step 3 differs from step 7
        ck.save(State(np.int32(3), negated), meta={"stage": "agent_tuning"}, force=True)
        ck.wait()
        ck.save(State(np.int32(7), params), meta={"stage": "cmat"}, force=True)
    return params
