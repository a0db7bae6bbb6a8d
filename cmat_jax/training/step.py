"""The LoRA training step: a pure, jitted `(state, frozen, batch) -> (state, metrics)`.

Only LoRA parameters are differentiated and carry optimizer state; the base is a frozen pytree
(bf16 by default). The state and the frozen base are pure nested dicts of arrays (what
`nnx.State.to_pure_dict()` gives), so they checkpoint as-is and merge back with
`nnx.merge(graphdef, lora_params, frozen)`.

Loss: pluggable (`losses.TokenCE` for SFT, `cmat.loss.CMATLoss` for CMAT), each a token mean
over `loss_mask` given as additive sums. Gradient accumulation splits the batch into
`accum_steps` micro-batches (row b goes to micro-batch b % accum_steps, which keeps each
device's rows local under a batch-sharded mesh) and sums the sums and gradients in a
`lax.scan`, so it equals the big batch exactly up to float summation order.
A non-finite loss or gradient norm leaves params and optimizer state untouched and counts it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cmat_jax import sharding as shd
from cmat_jax.model.lora import LoRAParam
from cmat_jax.training.losses import DEFAULT_CHUNK_TOKENS, TokenCE, finalize_metrics


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm clipping; None = off
    accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim field lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim field warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim field min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.accum_steps < 1:
            raise ValueError(f"optim field accum_steps must be >= 1, got {self.accum_steps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim field clip_norm must be positive, got {self.clip_norm}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine to lr * min_lr_ratio at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def then_constant(first: optax.Schedule, first_steps: int, lr: float) -> optax.Schedule:
    """`first` for `first_steps` steps, then the constant `lr` (CMAT: agent tuning's warmup +
    cosine, then the rounds' constant rate)."""
    if first_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([first, optax.constant_schedule(lr)], [first_steps])


def make_optimizer(
    cfg: OptimConfig, total_steps: int, *, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on `schedule` (default: `make_schedule(cfg,
    total_steps)`). The learning rate is an injected hyperparameter, so the optimizer state
    carries the lr of the last update."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=make_schedule(cfg, total_steps) if schedule is None else schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate stored by `make_optimizer`'s optimizer (0 if there is none)."""
    parts = opt_state if isinstance(opt_state, tuple) else (opt_state,)
    for part in parts:
        hyper = getattr(part, "hyperparams", None)
        if isinstance(hyper, dict) and "learning_rate" in hyper:
            return jnp.asarray(hyper["learning_rate"], jnp.float32)
    return jnp.zeros((), jnp.float32)


class TrainState(NamedTuple):
    step: jax.Array  # int32: steps taken (including skipped ones)
    params: Any  # LoRA params, pure nested dict
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)
    skipped: jax.Array  # int32: steps skipped for a non-finite loss or gradient


def split_model(model: nnx.Module, base_dtype: str | None = "bfloat16") -> tuple[Any, Any, Any]:
    """`(graphdef, lora_params, frozen)` as pure dicts; floating base params cast to
    `base_dtype` (None keeps the model's dtype)."""
    if getattr(model, "lora", None) is None:
        raise ValueError("model has no LoRA adapters; call model.add_lora(...) first")
    graphdef, lora_state, frozen_state = nnx.split(model, LoRAParam, ...)
    frozen = frozen_state.to_pure_dict()
    if base_dtype is not None:
        dt = jnp.dtype(base_dtype)
        frozen = jax.tree.map(
            lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen
        )
    return graphdef, lora_state.to_pure_dict(), frozen


def init_train_state(
    model: nnx.Module,
    optimizer: Any,
    seed: int = 0,
    *,
    base_dtype: str | None = "bfloat16",
) -> tuple[Any, Any, TrainState]:
    """`(graphdef, frozen, TrainState)` for `model` (which must have LoRA adapters)."""
    graphdef, params, frozen = split_model(model, base_dtype)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )
    return graphdef, frozen, state


def state_specs(graphdef: Any, optimizer: Any, state: TrainState, frozen: Any) -> tuple[Any, Any]:
    """PartitionSpec trees `(TrainState specs, frozen specs)` from the params' logical axes."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen))
    model = nnx.merge(graphdef, abstract[0].params, abstract[1])
    _, lora_state, frozen_state = nnx.split(model, LoRAParam, ...)
    p_specs = shd.state_specs(lora_state)
    f_specs = shd.state_specs(frozen_state)
    specs = TrainState(
        step=PartitionSpec(),
        params=p_specs,
        opt_state=shd.opt_state_specs(optimizer, abstract[0].opt_state, p_specs),
        rng=PartitionSpec(),
        skipped=PartitionSpec(),
    )
    return specs, f_specs


def guarded_update(
    optimizer: optax.GradientTransformation,
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    rng: jax.Array,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer update that is skipped (params and optimizer state kept, the skip
    counted) when the loss or the gradient norm is not finite. Returns the new state, the
    gradient norm and the int32 skip flag."""
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zero non-finite grads so the (discarded) update stays NaN-free.
    safe = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = optimizer.update(safe, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    skipped = (~ok).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=pick(new_params, state.params),
        opt_state=pick(new_opt, state.opt_state),
        rng=jax.random.key_data(rng),
        skipped=state.skipped + skipped,
    )
    return new_state, grad_norm, skipped


def split_micro(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...] with row b in micro-batch b % accum."""
    B = x.shape[0]
    x = x.reshape(B // accum, accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


class TrainStep:
    """Callable `step(state, frozen, batch) -> (state, metrics)`; compiled on first call.

    The one jitted LoRA step of every job: `loss` (`losses.TokenCE` for SFT,
    `cmat.loss.CMATLoss` for CMAT) is the only part that differs. Gradient accumulation sums
    the loss's additive sums and gradients over `accum_steps` micro-batches in a `lax.scan`
    and divides once by the summed tokens. With a mesh, params / optimizer state / frozen base
    get NamedShardings from their logical axes, the batch is sharded over ('data', 'fsdp'),
    and the state is donated.
    """

    def __init__(
        self,
        graphdef: Any,
        optimizer: Any,
        mesh: Mesh | None = None,
        accum_steps: int = 1,
        *,
        loss: Any = None,
        donate: bool = True,
    ):
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        self.graphdef = graphdef
        self.optimizer = optimizer
        self.mesh = mesh
        self.accum = accum_steps
        self.donate = donate
        self.loss = TokenCE() if loss is None else loss
        self._jitted = None
        self._shardings = None

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.loss.batch_keys

    # ------------------------------------------------------------------ pure step
    def _step(self, state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def parts(params, mb, key):
            return self.loss.sums(self.graphdef, params, frozen, mb, key)

        grad_fn = jax.value_and_grad(parts, has_aux=True)
        if self.accum == 1:
            (_, sums), grads = grad_fn(state.params, batch, step_rng)
        else:
            micro = {k: split_micro(v, self.accum) for k, v in batch.items()}
            keys = jax.random.split(step_rng, self.accum)
            shapes = jax.eval_shape(
                grad_fn, state.params, jax.tree.map(lambda v: v[0], micro), keys[0]
            )
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))

            def body(carry, xs):
                (_, s_i), g_i = grad_fn(state.params, *xs)
                return jax.tree.map(jnp.add, carry, (s_i, g_i)), None

            (sums, grads), _ = jax.lax.scan(body, init, (micro, keys))

        denom = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        metrics = finalize_metrics(sums, self.loss.denominators)
        new_state, grad_norm, skipped = guarded_update(
            self.optimizer, state, grads, metrics["loss"], rng
        )
        metrics.update(grad_norm=grad_norm, lr=current_lr(new_state.opt_state), skipped=skipped)
        return new_state, metrics

    # ------------------------------------------------------------------ compile + call
    def shardings(self, state: TrainState, frozen: Any, batch: Mapping[str, Any]):
        """(state, frozen, batch) NamedSharding trees for `mesh`."""
        s_specs, f_specs = state_specs(self.graphdef, self.optimizer, state, frozen)
        b_specs = {k: shd.batch_spec(jnp.ndim(v)) for k, v in batch.items()}
        return tuple(shd.named(self.mesh, t) for t in (s_specs, f_specs, b_specs))

    def _compile(self, state, frozen, batch):
        donate = (0,) if self.donate else ()
        if self.mesh is None:
            return jax.jit(self._step, donate_argnums=donate)
        s_sh, f_sh, b_sh = self._shardings = self.shardings(state, frozen, batch)
        repl = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(
            self._step,
            in_shardings=(s_sh, f_sh, b_sh),
            out_shardings=(s_sh, repl),
            donate_argnums=donate,
        )

    def place(self, state: TrainState, frozen: Any, batch: Mapping[str, Any]):
        """Put (state, frozen, batch) on the mesh (a no-op for arrays already placed)."""
        if self.mesh is None:
            return state, frozen, {k: jnp.asarray(v) for k, v in batch.items()}
        if self._shardings is None:
            self._shardings = self.shardings(state, frozen, batch)
        return jax.device_put((state, frozen, dict(batch)), self._shardings)

    def __call__(self, state: TrainState, frozen: Any, batch: Mapping[str, Any]):
        self.loss.validate(batch)
        batch = {k: v for k, v in batch.items() if k in self.batch_keys and v is not None}
        B = jnp.shape(batch["inputs"])[0]
        if B % self.accum:
            raise ValueError(f"batch size {B} is not divisible by accum_steps={self.accum}")
        if self._jitted is None:
            self._jitted = self._compile(state, frozen, batch)
        state, frozen, batch = self.place(state, frozen, batch)
        if self.mesh is None:
            return self._jitted(state, frozen, batch)
        with jax.set_mesh(self.mesh):
            return self._jitted(state, frozen, batch)


def make_train_step(
    graphdef: Any,
    optimizer: Any,
    mesh: Mesh | None = None,
    accum_steps: int = 1,
    *,
    loss: Any = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    donate: bool = True,
) -> TrainStep:
    """Jitted `step(state, frozen, batch) -> (state, metrics)` of `loss` (default: the SFT
    token cross-entropy with `chunk_tokens`); see TrainStep."""
    loss = TokenCE(chunk_tokens=chunk_tokens) if loss is None else loss
    return TrainStep(graphdef, optimizer, mesh, accum_steps, loss=loss, donate=donate)
