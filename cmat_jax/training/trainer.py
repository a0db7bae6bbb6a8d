"""The one trainer of every job: LoRA train state on a device mesh, one jitted step per loss.

`train sft` and `train cmat` (agent tuning and the CMAT rounds) both train through a `Trainer`:

    trainer = Trainer(model, optimizer, mesh=mesh, accum_steps=..., seed=..., base_dtype=...)
    metrics = trainer.step(batch, loss)          # loss: TokenCE() | CMATLoss(cfg) | ...
    trainer.save(ckpt, data_state, meta) / trainer.restore(ckpt)

The loss is the only part that differs between the jobs (see `training.step.TrainStep`); the
optimizer (`step.make_optimizer`), gradient accumulation, non-finite skipping, shardings,
multi-process batch assembly (`cmat_jax.distributed`) and checkpoints are shared. Under a mesh
the frozen base and the LoRA params live sharded by their logical axes; `model()` gives an
`nnx` module over those same arrays for generation (the KV cache is sharded by the generator).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cmat_jax import sharding as shd
from cmat_jax.distributed import batch_share, global_batch
from cmat_jax.model.lora import set_lora_params
from cmat_jax.training.checkpoint import Checkpointer
from cmat_jax.training.losses import TokenCE
from cmat_jax.training.step import TrainState, TrainStep, init_train_state, state_specs


class Trainer:
    """LoRA params + optimizer state + frozen base of one model, and the compiled steps.

    `model` must have LoRA adapters; under `mesh` it is sharded in place (its arrays are the
    trainer's frozen base). `base_dtype` casts the floating base params (None keeps them).
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: Any,
        *,
        mesh: Mesh | None = None,
        accum_steps: int = 1,
        seed: int = 0,
        base_dtype: str | None = "bfloat16",
        donate: bool = True,
    ):
        if mesh is not None:
            shd.shard_model(model, mesh)
        self.mesh = mesh
        self.optimizer = optimizer
        self.accum = accum_steps
        self.donate = donate
        self.graphdef, self.frozen, self.state = init_train_state(
            model, optimizer, seed, base_dtype=base_dtype
        )
        self._steps: dict[Any, TrainStep] = {}
        if mesh is not None:
            self.state, self.frozen = jax.device_put((self.state, self.frozen), self.shardings())

    # ------------------------------------------------------------------ placement
    def shardings(self) -> tuple[Any, Any] | None:
        """(TrainState, frozen) NamedSharding trees on the mesh (None without one)."""
        if self.mesh is None:
            return None
        s_specs, f_specs = state_specs(self.graphdef, self.optimizer, self.state, self.frozen)
        return shd.named(self.mesh, s_specs), shd.named(self.mesh, f_specs)

    def put_batch(self, batch: Mapping[str, Any], *, whole: bool) -> dict[str, Any]:
        """Host batch -> arrays the step takes. `whole`: every process holds the whole global
        batch (CMAT rows, identical on all processes) and keeps its own rows; else `batch`
        already holds only this process's rows (`distributed.batch_share`, SFT's loader)."""
        batch = {k: v for k, v in batch.items() if v is not None}
        if self.mesh is None:
            return {k: np.asarray(v) for k, v in batch.items()}
        if whole:
            share = batch_share(self.mesh, len(batch["inputs"]))
            rows = slice(share.start, share.start + share.rows)
            batch = {k: np.asarray(v)[rows] for k, v in batch.items()}
        return global_batch(batch, self.mesh)

    # ------------------------------------------------------------------ steps
    def step_fn(self, loss: Any = None) -> TrainStep:
        """The compiled step of `loss` (default TokenCE()), one per loss for the run."""
        loss = TokenCE() if loss is None else loss
        fn = self._steps.get(loss)
        if fn is None:
            fn = self._steps[loss] = TrainStep(
                self.graphdef,
                self.optimizer,
                self.mesh,
                self.accum,
                loss=loss,
                donate=self.donate,
            )
        return fn

    def step(self, batch: Mapping[str, Any], loss: Any = None) -> dict[str, jax.Array]:
        """One optimizer step on `batch` (from `put_batch`, or host arrays on one process);
        returns the step's metrics as (replicated) device scalars."""
        self.state, metrics = self.step_fn(loss)(self.state, self.frozen, batch)
        return metrics

    @property
    def step_count(self) -> int:
        return int(jax.device_get(self.state.step))

    # ------------------------------------------------------------------ the model
    def model(self) -> nnx.Module:
        """An nnx module over the trainer's arrays (the current LoRA params and the frozen
        base, sharded as they are): what the generator runs."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen)

    def sync_into(self, model: nnx.Module) -> None:
        """Write the current LoRA params into `model` (a module of the same graph)."""
        set_lora_params(model, self.state.params)

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt: Checkpointer, data_state: Any = None, meta: Any = None) -> None:
        ckpt.save(self.state, data_state=data_state, meta=meta, force=True)

    def restore(self, ckpt: Checkpointer, step: int | None = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` (default: the newest) onto this trainer's devices;
        `(data_state, meta)`."""
        shardings = self.shardings()
        if shardings is None:
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
        else:
            target = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                self.state,
                shardings[0],
            )
        state, data_state, meta = ckpt.restore(target, step)
        self.state = TrainState(*state)
        return data_state, meta
