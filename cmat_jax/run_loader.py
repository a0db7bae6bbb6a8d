"""Load a model for inference or export from any source the CLIs take: a training run directory
(its base model plus the LoRA adapters of a checkpoint), a preset, an HF directory or a GGUF file.

A run directory is what `cmat_jax.train` writes (see `cmat_jax.run_dir`): `config.json` names the
base model (`model`), the LoRA config (`lora`), the trained slot (`slot`) and the dtypes and
attention kernel the run used; `checkpoints/` holds the adapters. :func:`load_run` rebuilds that
model the way the run built it (:func:`build_run_model`) and fills its adapters from a checkpoint
(:func:`set_lora_params`, which the CMAT job also uses to hand trained params to generation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from cmat_jax.model.lora import LoRAConfig, set_lora_params
from cmat_jax.run_dir import CHECKPOINTS, CONFIG, RunDir, RunDirError


class SourceError(ValueError):
    """A model source that cannot be loaded as asked; the message names it (and the flag)."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference: its LoRA slots filled when it came from a run."""

    model: Any
    tokenizer: Any
    source: str
    """What was asked for (a run dir, preset, HF dir or GGUF file)."""
    kind: Literal["run", "base"]
    base: str
    """The base model source (the run's `model`, or `source` itself)."""
    default_slot: str = "none"
    """The slot a run trained (its config's `slot`, else its first); "none" for a base."""
    lora: LoRAConfig | None = None
    step: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    run_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def slots(self) -> tuple[str, ...]:
        """The adapter slots, "none" (the frozen base) first."""
        return ("none", *(self.lora.slots if self.lora else ()))

    def slot(self, name: str | None, flag: str = "--slot") -> str:
        """``name`` checked against this model's slots (None = :attr:`default_slot`)."""
        if name is None:
            return self.default_slot
        if name not in self.slots:
            raise SourceError(
                f"{flag}: {name!r} is not an adapter slot of {self.source} "
                f"(slots: {', '.join(self.slots)})"
            )
        return name

    def info(self) -> dict[str, Any]:
        """Where the weights came from (for results files and export metadata)."""
        if self.kind == "base":
            return {"source": self.source, "kind": "base"}
        return {
            "source": str(self.run_dir),
            "kind": "run",
            "base": self.base,
            "step": self.step,
            "stage": self.meta.get("stage"),
        }


def is_run_dir(path: str | Path) -> bool:
    """A training run directory: config.json naming its `job`, or a base `model` and a `lora`
    config, beside `checkpoints/` (an HF model dir has config.json too, but neither)."""
    p = Path(path).expanduser()
    if not (p.is_dir() and (p / CONFIG).is_file()):
        return False
    if (p / CHECKPOINTS).exists():
        return True
    try:
        cfg = RunDir(p).read_config()
    except RunDirError:
        return False
    return "model_type" not in cfg and ("lora" in cfg or "job" in cfg)


def lora_config(run_cfg: dict[str, Any], where: str) -> LoRAConfig:
    """The run's LoRAConfig from its config.json's `lora` mapping."""
    try:
        lora = dict(run_cfg["lora"])
        lora["targets"], lora["slots"] = tuple(lora["targets"]), tuple(lora["slots"])
        return LoRAConfig(**lora)
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{where}: bad or missing 'lora' config ({e})") from None


def build_run_model(
    run_cfg: dict[str, Any],
    where: str,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    attention_impl: str | None = None,
    remat: str | None = None,
    with_base: bool = True,
) -> tuple[Any, Any, LoRAConfig]:
    """``(model, tokenizer, lora_cfg)``: the run's base with freshly initialized LoRA slots, built
    with the run's dtypes, remat and attention kernel unless overridden (``with_base=False``:
    shapes only, no weights read and no tokenizer). What training builds from its config, so
    a trainer's start and resume can call it too."""
    from flax import nnx

    from cmat_jax.weights.load import load_model

    base = run_cfg.get("model")
    if not isinstance(base, str) or not base:
        raise SourceError(f"{where}: field 'model' must name the base model source")
    lora_cfg = lora_config(run_cfg, where)
    param_dtype = dtype or run_cfg.get("param_dtype") or "float32"
    compute = (
        compute_dtype or (run_cfg.get("compute_dtype") if dtype is None else None) or param_dtype
    )
    overrides: dict[str, Any] = {}
    if attention_impl or run_cfg.get("attention_impl"):
        overrides["attention_impl"] = attention_impl or run_cfg["attention_impl"]
    if remat or run_cfg.get("remat"):  # no cost without a backward pass; the run's numerics
        overrides["remat"] = remat or run_cfg["remat"]
    tokenizer = None
    try:
        if with_base:
            model, tokenizer = load_model(base, param_dtype, compute_dtype=compute, **overrides)
        else:
            model = _model_shapes(base, param_dtype, compute)
    except ValueError as e:
        raise SourceError(f"{where}: base model {base!r}: {e}") from None
    # The run's seed: a fresh run's adapters start as its job's did (a restore overwrites them).
    model.add_lora(lora_cfg, rngs=nnx.Rngs(int(run_cfg.get("seed", 0))))
    return model, tokenizer, lora_cfg


def _model_shapes(source: str, dtype: str, compute_dtype: str) -> Any:
    from flax import nnx

    from cmat_jax.model.config import ModelConfig
    from cmat_jax.model.llama import Llama

    cfg = ModelConfig.from_hf(hf_config(source), param_dtype=dtype, compute_dtype=compute_dtype)
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def hf_config(source: str) -> dict[str, Any]:
    """The HF config.json dict of a base model source (HF dir, GGUF file or preset)."""
    from cmat_jax.weights.registry import resolve_source

    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        from cmat_jax.weights.gguf_io import read_gguf

        return dict(read_gguf(resolved.path).hf_config)
    return dict(resolved.hf_config())


def load_run(
    run_dir: str | Path,
    step: int | None = None,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    attention_impl: str | None = None,
    with_base: bool = True,
) -> LoadedModel:
    """A run's model: :func:`build_run_model`, then the LoRA params of checkpoint ``step``
    (default: the newest complete one)."""
    import jax
    from flax import nnx

    from cmat_jax.model.lora import LoRAParam
    from cmat_jax.training.checkpoint import Checkpointer

    run = RunDir(Path(run_dir).expanduser().resolve())
    cfg = run.read_config()
    where = str(run.config_path)
    if not run.checkpoint_dir.is_dir():
        raise SourceError(f"{run.path}: run directory without checkpoints/ (nothing trained yet)")
    model, tokenizer, lora_cfg = build_run_model(
        cfg,
        where,
        dtype=dtype,
        compute_dtype=compute_dtype,
        attention_impl=attention_impl,
        with_base=with_base,
    )
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state.to_pure_dict()
    )
    ckpt = Checkpointer(run.checkpoint_dir, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise SourceError(f"{run.checkpoint_dir}: no complete checkpoint")
        params, meta = ckpt.restore_lora(target, step)
    finally:
        ckpt.close()
    set_lora_params(model, params)
    default = cfg.get("slot") or lora_cfg.slots[0]
    if default not in lora_cfg.slots:
        raise SourceError(f"{where}: slot {default!r} is not among lora.slots {lora_cfg.slots}")
    return LoadedModel(
        model,
        tokenizer,
        source=str(run_dir),
        kind="run",
        base=cfg["model"],
        default_slot=default,
        lora=lora_cfg,
        step=int(step),
        meta=meta,
        run_config=cfg,
        run_dir=run.path,
    )


def load_source(
    source: str | Path,
    step: int | None = None,
    *,
    dtype: str | None = None,
    attention_impl: str | None = None,
    default_dtype: str = "bfloat16",
) -> LoadedModel:
    """Any model source: a run directory (:func:`load_run`; ``dtype`` / ``attention_impl``
    None = the run's own), else a preset, HF directory or GGUF file (``load_model``, dtype
    ``dtype`` or ``default_dtype``, no adapters)."""
    from cmat_jax.weights.load import load_model

    if is_run_dir(source):
        return load_run(source, step, dtype=dtype, attention_impl=attention_impl)
    if step is not None:
        raise SourceError(f"--step {step} needs a training run directory, got {source}")
    kw = {"attention_impl": attention_impl} if attention_impl else {}
    model, tokenizer = load_model(source, dtype or default_dtype, **kw)
    return LoadedModel(model, tokenizer, source=str(source), kind="base", base=str(source))
