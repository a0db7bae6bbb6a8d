"""`python -m cmat_jax.train <subcommand> ...`: training entry points (tyro over frozen dataclasses).

Subcommands:

- `sft`  — LoRA supervised fine-tuning on JSONL conversations (the TinyAgent stage).
- `cmat` — agent tuning + CMAT rounds + evaluation (`cmat_jax.cmat.loop`).

With NO subcommand, `python -m cmat_jax.train [--out DIR] [--resume] [...]` runs the default job
end to end on a CPU: `cmat --preset cmat-default` (configs/cmat.py), into a fresh
`runs/cmat-default-<time>` directory unless `--out` is given.

Every job writes a run directory (see `cmat_jax.run_dir`); an existing one is never
overwritten: pass `--resume` to continue it from its newest complete checkpoint.
Presets live in `configs/*.py` (`--preset NAME`; explicit flags override the preset).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from cmat_jax.cli import AttentionImpl, Dtype, flag_value, parse, run_cli
from cmat_jax.training.checkpoint import CheckpointConfig

CONFIGS_ENV = "CMAT_JAX_CONFIGS"


# ----------------------------------------------------------------------------- CLI dataclasses
# These mirror LoRAConfig / OptimConfig / MeshConfig field by field so that `--help` can
# document every field (tests check the mirrors stay complete).


@dataclass(frozen=True)
class LoRAArgs:
    """LoRA adapters on the frozen base."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / rank) * x A B."""
    dropout: float = 0.0
    """Dropout on the adapter input (training only)."""
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    """Projections to adapt: short names (q k v o gate up down) or HF names / patterns (*_proj)."""
    slots: tuple[str, ...] = ("assistant",)
    """Adapter slots (one per agent role); 'none' is reserved for the base model."""
    dtype: Dtype = "float32"
    """Storage dtype of the adapter weights (and of their optimizer state)."""

    def build(self):
        from cmat_jax.model.lora import LoRAConfig

        return LoRAConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class OptimArgs:
    """AdamW with linear warmup and cosine decay, global-norm clipping."""

    lr: float = 2e-4
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio on the last step."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_norm: float | None = 1.0
    """Clip gradients to this global norm (None = no clipping)."""
    accum_steps: int = 1
    """Gradient accumulation: split each batch into this many micro-batches."""

    def build(self):
        from cmat_jax.training.step import OptimConfig

        return OptimConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class MeshArgs:
    """Device mesh over ('data', 'fsdp', 'tensor'); one axis may be -1 (= the rest)."""

    data: int = -1
    """Data-parallel axis size."""
    fsdp: int = 1
    """Fully-sharded data-parallel axis size (shards params over the embed dim)."""
    tensor: int = 1
    """Tensor-parallel axis size (heads, mlp, vocab)."""

    def build(self):
        from cmat_jax.sharding import MeshConfig

        return MeshConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class SFTJob:
    """LoRA supervised fine-tuning on JSONL conversations, loss on assistant tokens only."""

    model: str = "smollm2-135m-instruct"
    """Base model: an HF checkpoint dir, a .gguf file or a preset name (not saved in the run)."""
    data: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """JSONL file of conversations (OpenAI `messages` or ShareGPT `conversations`); repeat
    `--data` for several files."""
    mix: str = ""
    """Sampling ratios of the --data files, comma-separated (e.g. 0.8,0.2); empty = by size."""
    out: str = "runs/sft"
    """Run directory (config, metrics, TensorBoard, checkpoints); never overwritten."""
    resume: bool = False
    """Continue the run in --out from its newest complete checkpoint (config must match)."""
    preset: str | None = None
    """Start from a preset in configs/ (explicit flags override it)."""
    steps: int = 100
    """Optimizer steps to train in total."""
    seed: int = 0
    """Seeds the adapters' init, dropout and the data order."""
    slot: str = "assistant"
    """Adapter slot trained by this job (one of --lora.slots)."""
    seq_len: int = 512
    """Tokens per packed row; also the longest conversation kept."""
    batch_size: int = 8
    """Rows per global batch (all devices and processes together)."""
    overlong: Literal["truncate", "error"] = "truncate"
    """Conversations longer than --seq-len: drop trailing turns ('truncate') or fail ('error')."""
    data_format: Literal["auto", "messages", "sharegpt"] = "auto"
    """Record format of the JSONL files ('auto' decides per line)."""
    skip_untrainable: bool = False
    """Skip conversations without a trained assistant turn instead of failing."""
    pack_buffer: int = 16
    """Open rows kept by the first-fit packer (more = denser packing)."""
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage dtype of the frozen base weights."""
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Matmul input dtype (accumulation is always float32)."""
    attention_impl: AttentionImpl = "chunked"
    """Attention kernel: xla | cudnn | pallas | chunked | auto (chunked: blockwise, skips causal
    blocks, O(T) memory — the fastest on CPU)."""
    remat: Literal["none", "full", "dots_saveable"] = "dots_saveable"
    """Rematerialize each layer in the backward pass (dots_saveable keeps matmul outputs:
    measured 2x less memory than none at the same speed on CPU)."""
    log_every: int = 1
    """Log metrics (JSONL, TensorBoard) every N steps."""
    progress: bool = True
    """Show a progress bar with loss and tokens/s."""
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    """LoRA adapters: rank, alpha, targets and the role slots."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """Optimizer, schedule and gradient accumulation."""
    mesh: MeshArgs = field(default_factory=MeshArgs)
    """Device mesh over (data, fsdp, tensor); one axis may be -1 (all remaining devices)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and how many to keep."""

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "log_every", "pack_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )

    def mix_ratios(self) -> tuple[float, ...]:
        if not self.mix.strip():
            return ()
        try:
            return tuple(float(x) for x in self.mix.split(","))
        except ValueError:
            raise ValueError(f"--mix: expected comma-separated numbers, got {self.mix!r}") from None

    def data_config(self):
        from cmat_jax.data import DataConfig

        if not self.data:
            raise ValueError("--data: at least one JSONL file is required")
        return DataConfig(
            paths=tuple(self.data),
            mix=self.mix_ratios(),
            seq_len=self.seq_len,
            global_batch=self.batch_size,
            seed=self.seed,
            overlong=self.overlong,
            format=self.data_format,
            skip_untrainable=self.skip_untrainable,
            pack_buffer=self.pack_buffer,
        )


def _absolute_if_path(source: str) -> str:
    """Record local model / data paths absolutely, so resume and export work from any cwd."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def resolved_config(job: SFTJob) -> dict:
    """The run config written to DIR/config.json (paths made absolute)."""
    job = dataclasses.replace(
        job,
        model=_absolute_if_path(job.model),
        data=tuple(_absolute_if_path(d) for d in job.data),
        out=str(Path(job.out).expanduser().resolve()),
    )
    # Through JSON once, so it compares equal to the config.json read back on --resume.
    return json.loads(json.dumps({"job": "sft", **dataclasses.asdict(job)}))


# ----------------------------------------------------------------------------- presets


def configs_dir() -> Path:
    """$CMAT_JAX_CONFIGS; else the presets installed inside the package (a wheel maps the
    repository's configs/ to `cmat_jax/configs`); else configs/ beside the package (a source
    checkout or an editable install)."""
    env = os.environ.get(CONFIGS_ENV)
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def load_presets(kind: type) -> dict[str, Any]:
    """Presets of job type `kind` from every `configs/*.py` defining `PRESETS = {name: job}`."""
    found: dict[str, Any] = {}
    root = configs_dir()
    for path in sorted(root.glob("*.py")) if root.is_dir() else []:
        name = f"_cmat_jax_configs_{path.stem}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses defined there look their module up
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception:
                del sys.modules[name]
                raise
        for name, job in getattr(module, "PRESETS", {}).items():
            if isinstance(job, kind):
                found[name] = job
    return found


def preset_default(kind: type, argv: Sequence[str]) -> Any:
    """The tyro default for `kind`: the preset named by --preset in argv, or kind()."""
    name = flag_value(argv, "--preset")
    if name is None or name == "None":
        return kind()
    presets = load_presets(kind)
    if name not in presets:
        known = ", ".join(sorted(presets)) or "none"
        raise ValueError(f"--preset: unknown preset {name!r} (known presets: {known})")
    return dataclasses.replace(presets[name], preset=name)


# ----------------------------------------------------------------------------- the SFT job


def _with_adapter(batch: dict, slot_id: int) -> dict:
    import numpy as np

    batch["adapter_ids"] = np.full((len(batch["inputs"]),), slot_id, np.int32)
    return batch


def run_sft(job: SFTJob) -> dict:
    """Train, log and checkpoint one SFT run; returns the last logged metrics."""
    import jax
    from flax import nnx

    from cmat_jax import sharding as shd
    from cmat_jax.data import build_iterator
    from cmat_jax.distributed import batch_share
    from cmat_jax.run_dir import MetricsLogger, Progress, RunDir
    from cmat_jax.training.checkpoint import Checkpointer
    from cmat_jax.training.mfu import MFUMeter
    from cmat_jax.training.step import make_optimizer
    from cmat_jax.training.trainer import Trainer
    from cmat_jax.weights.load import load_model

    config = resolved_config(job)
    lora_cfg = job.lora.build()
    slot_id = lora_cfg.slot_id(job.slot)
    if slot_id < 0:
        raise ValueError("--slot: 'none' is the frozen base model; pick a LoRA slot to train")
    optim_cfg = job.optim.build()
    data_cfg = job.data_config()
    mesh_cfg = job.mesh.build()
    for path in data_cfg.paths:  # fail on a missing file before any run dir is created
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data: {path}: no such file")

    primary = jax.process_index() == 0
    run = RunDir(config["out"])
    resuming = job.resume
    if primary and not run.is_fresh():
        # An existing run dir: refuse it, or check its config, before loading anything.
        resuming = run.open(config, resume=job.resume)

    mesh = shd.make_mesh(mesh_cfg)
    # Each device reads only its shard of each weight (a 7B base never sits on one chip).
    model, tokenizer = load_model(
        job.model,
        job.param_dtype,
        compute_dtype=job.compute_dtype,
        attention_impl=job.attention_impl,
        remat=job.remat,
        mesh=mesh,
    )
    model.add_lora(lora_cfg, rngs=nnx.Rngs(job.seed))
    # Multi-host: each process feeds only the rows of the global batch its devices hold.
    share = batch_share(mesh, job.batch_size)
    data = build_iterator(data_cfg, tokenizer, process_index=share.index, process_count=share.count)
    shd.validate(model.config, mesh, job.batch_size, accum_steps=optim_cfg.accum_steps)
    trainer = Trainer(
        model,
        make_optimizer(optim_cfg, job.steps),
        mesh=mesh,
        accum_steps=optim_cfg.accum_steps,
        seed=job.seed,
        base_dtype=job.param_dtype,
    )
    model_cfg = model.config
    del model
    if primary and run.is_fresh():
        # Everything the user gave has been validated: only now create the run dir.
        resuming = run.open(config, resume=job.resume)

    ckpt = Checkpointer(run.checkpoint_dir, job.checkpoint)
    start = 0
    if resuming and ckpt.latest_step() is not None:
        data_state, _ = trainer.restore(ckpt)
        data.restore(data_state)
        start = trainer.step_count

    logger = MetricsLogger(run, resume_step=start if resuming else None, enabled=primary)
    bar = Progress(job.steps, start, enabled=primary and job.progress)
    meta = {"model": config["model"], "slot": job.slot}
    last: dict = {}
    # MFU over the wall time between log points (the first, compiling step is not counted).
    mfu = MFUMeter(model_cfg, job.seq_len, lora_rank=lora_cfg.rank)
    timer, timed_steps = time.perf_counter(), 0
    try:
        for step in range(start + 1, job.steps + 1):
            batch = _with_adapter(next(data), slot_id)
            tokens = int((batch["segment_ids"] > 0).sum()) * share.count
            metrics = trainer.step(trainer.put_batch(batch, whole=False))
            loss = None
            timed_steps += 1
            if step % job.log_every == 0 or step == job.steps or step == start + 1:
                last = {k: v.item() for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                if step > start + 1:
                    step_s = (now - timer) / timed_steps
                    last.update(mfu.metrics(step_s, job.batch_size * job.seq_len))
                timer, timed_steps = now, 0
                loss = last["loss"]
                if step % job.log_every == 0 or step == job.steps:
                    logger.log(step, last)
            bar.update(1, tokens, loss)
            if step % job.checkpoint.every == 0 or step == job.steps:
                trainer.save(ckpt, data.state(), meta)
        ckpt.wait()
    finally:
        bar.close()
        logger.close()
        ckpt.close()
    return last


# ----------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Subcommand:
    kind: type
    run: Callable[[Any], Any]
    help: str


def run_cmat(job: Any) -> dict:
    """The CMAT job (`cmat_jax.cmat.loop.run_cmat`), imported when it runs, like run_sft's
    dependencies, so `--help` and config errors answer without loading JAX."""
    from cmat_jax.cmat.loop import run_cmat as run

    return run(job)


def _subcommands() -> dict[str, Subcommand]:
    # Local: cmat.job imports this module's LoRAArgs / MeshArgs (a real import cycle).
    from cmat_jax.cmat.job import CMATJob

    return {
        "sft": Subcommand(SFTJob, run_sft, "LoRA SFT on JSONL conversations"),
        "cmat": Subcommand(CMATJob, run_cmat, "agent tuning + CMAT rounds + evaluation"),
    }


def _usage(cmds: dict[str, Subcommand]) -> str:
    lines = ["usage: python -m cmat_jax.train {" + ",".join(cmds) + "} [OPTIONS]", ""]
    lines += [__doc__.strip().splitlines()[0], "", "subcommands:"]
    lines += [f"  {name:<6} {c.help}" for name, c in cmds.items()]
    lines += [
        "",
        "With no subcommand: run the default job, `cmat --preset cmat-default` (see the module docstring).",
    ]
    lines += ["Run `python -m cmat_jax.train SUBCOMMAND --help` for its options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        # The default job: SmolLM2 -> agent tuning -> CMAT rounds -> evaluation.
        argv = ["cmat", "--preset", "cmat-default", *argv]
        if "--out" not in argv:
            argv += ["--out", f"runs/cmat-default-{time.strftime('%Y%m%d-%H%M%S')}"]
    cmds = _subcommands()
    if argv[0] in ("-h", "--help"):
        print(_usage(cmds))
        return None
    name, rest = argv[0], argv[1:]
    if name not in cmds:
        raise ValueError(f"unknown subcommand {name!r} (choose from: {', '.join(cmds)})")
    cmd = cmds[name]
    default = preset_default(cmd.kind, rest)
    job = parse(cmd.kind, rest, default=default, prog=f"python -m cmat_jax.train {name}")
    return cmd.run(job)


if __name__ == "__main__":
    # Run the importable module's main, not this `__main__` copy: presets in configs/ import
    # `cmat_jax.train` and must see the same SFTJob class.
    from cmat_jax import train as _train

    run_cli(_train.main)
