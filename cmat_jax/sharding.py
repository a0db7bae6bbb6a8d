"""Device mesh and sharding by names: one table maps logical axes to mesh axes.

Every parameter carries `logical_axes` metadata (e.g. `("layers", "embed", "heads")`); the
rules below turn those names into `PartitionSpec`s over the mesh `('data', 'fsdp', 'tensor')`.
LoRA A is tagged `(layers, None, <base input axis>, lora_rank)` and B
`(layers, None, lora_rank, <base output axis>)`, so they shard like the base dims they touch and
the rank stays replicated. Optimizer moments mirror the params they belong to; batches shard
their leading dim over `('data', 'fsdp')`.

`validate` checks divisibility before anything is compiled, so an impossible mesh is a one-line
error instead of an XLA failure deep in a compile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cmat_jax.model.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# The one table: logical axis name -> mesh axis (or axes), None = replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "lora_rank": None,
    "seq": None,
    "head_dim": None,
}


class ShardingError(ValueError):
    """A mesh that cannot hold this model or batch; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; exactly one axis may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int | None = None) -> tuple[int, int, int]:
        n = jax.device_count() if num_devices is None else num_devices
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ShardingError(f"mesh: at most one axis may be -1, got {self}")
        for name, s in zip(MESH_AXES, sizes, strict=True):
            if s == 0 or s < -1:
                raise ShardingError(f"mesh: axis {name!r} must be positive or -1, got {s}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n % known:
                raise ShardingError(
                    f"mesh: {n} devices are not divisible by the fixed axes of {self} ({known})"
                )
            sizes[sizes.index(-1)] = n // known
        if math.prod(sizes) != n:
            raise ShardingError(
                f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {n} devices are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = (cfg or MeshConfig()).shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_sizes(mesh: Mesh | MeshConfig) -> dict[str, int]:
    if isinstance(mesh, MeshConfig):
        sizes = (mesh.data, mesh.fsdp, mesh.tensor)
        if -1 in sizes:  # only then does the device count matter
            sizes = mesh.shape()
        return dict(zip(MESH_AXES, sizes, strict=True))
    return {a: int(mesh.shape[a]) if a in mesh.shape else 1 for a in MESH_AXES}


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for one array. A mesh axis used by an earlier dim is not reused (that dim
    is replicated instead): e.g. activations `(batch, seq, embed)` shard batch over fsdp, so
    embed stays whole there."""
    if not logical_axes:
        return PartitionSpec()
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise ShardingError(f"logical axis {name!r} has no sharding rule")
        target = None if name is None else rules[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _var_axes(v: nnx.Variable) -> tuple[str | None, ...] | None:
    return v.get_metadata().get("logical_axes")


def state_specs(state: nnx.State, *, pure: bool = True) -> Any:
    """PartitionSpecs for an `nnx.State` (from `nnx.split`/`nnx.state`): a pure nested dict
    (matching `state.to_pure_dict()`) when `pure`, else a State of PartitionSpec leaves."""
    specs = jax.tree.map(lambda v: logical_to_spec(_var_axes(v)), state, is_leaf=_is_var)
    return specs.to_pure_dict() if pure and isinstance(specs, nnx.State) else specs


def named(mesh: Mesh, specs: Any) -> Any:
    """Map a tree of PartitionSpecs to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def opt_state_specs(optimizer: Any, opt_state: Any, param_specs: Any) -> Any:
    """Optimizer state specs: moments like the params they mirror, counters replicated."""
    return optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        opt_state,
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_spec(ndim: int) -> PartitionSpec:
    """A batch array [B, ...]: leading dim over (data, fsdp), the rest replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter (base and LoRA) on `mesh` by its logical axes, in place."""
    state = nnx.state(model)
    specs = state_specs(state, pure=False)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    nnx.update(model, jax.device_put(state, shardings))
    return model


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names for activations, e.g.
    `constrain(x_BTD, ("batch", "seq", "embed"))`; a no-op outside a mesh context
    (`jax.set_mesh(mesh)`), so model code can call it unconditionally."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def validate(
    cfg: ModelConfig,
    mesh: Mesh | MeshConfig,
    batch_size: int | None = None,
    *,
    accum_steps: int = 1,
) -> None:
    """Raise ShardingError before compiling if `cfg` and the batch cannot be laid on `mesh`."""
    sizes = _mesh_sizes(mesh)
    t, f = sizes["tensor"], sizes["fsdp"]
    checks = [
        ("num_kv_heads", cfg.num_kv_heads, "tensor", t),
        ("num_heads", cfg.num_heads, "tensor", t),
        ("intermediate_size", cfg.intermediate_size, "tensor", t),
        ("vocab_size", cfg.vocab_size, "tensor", t),
        ("hidden_size", cfg.hidden_size, "fsdp", f),
    ]
    for field, value, axis, size in checks:
        if value % size:
            raise ShardingError(
                f"model field {field}={value} is not divisible by mesh axis {axis}={size}"
            )
    if batch_size is not None:
        dp = sizes["data"] * f
        if accum_steps < 1 or batch_size % accum_steps:
            raise ShardingError(
                f"batch size {batch_size} is not divisible by accum_steps={accum_steps}"
            )
        micro = batch_size // accum_steps
        if micro % dp:
            raise ShardingError(
                f"batch size {batch_size} (micro-batch {micro} with accum_steps={accum_steps}) "
                f"is not divisible by data*fsdp = {sizes['data']}*{f} = {dp}"
            )
