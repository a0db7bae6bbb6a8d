"""`python -m cmat_jax.export --run DIR --format peft|merged --out DIR [--slot NAME]`.

- `peft`:   `adapter_model.safetensors` + `adapter_config.json` for one adapter slot, loadable with
  `peft.PeftModel.from_pretrained(hf_base, DIR)` on the run's HF base model.
- `merged`: an HF checkpoint (`config.json`, `model.safetensors`, tokenizer files) with the slot's
  adapter folded into the base weights, loadable with `transformers`.

The LoRA params come from the run's newest complete checkpoint (or `--step`); the base model is
re-read from the source named in the run config. The output directory must not exist.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmat_jax.cli import run_cli
from cmat_jax.model.lora import HF_NAMES, LoRAConfig

# HF module path (inside a decoder layer) of each LoRA target.
_HF_MODULE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "generation_config.json",
)


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message names the run dir or field."""


@dataclass(frozen=True)
class ExportArgs:
    """Export a training run's adapter as a PEFT adapter or a merged HF checkpoint."""

    run: str
    """Training run directory (written by `python -m cmat_jax.train`)."""
    out: str
    """Output directory; must not exist yet."""
    format: Literal["peft", "merged"] = "peft"
    """'peft': adapter files for peft; 'merged': an HF checkpoint with the adapter folded in."""
    slot: str | None = None
    """Adapter slot to export (default: the slot the run trained)."""
    step: int | None = None
    """Checkpoint step to export (default: the newest complete one)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Tensor dtype written to the safetensors file."""


@dataclass
class RunAdapters:
    """A run's base model source, LoRA config and restored LoRA params (a model with them)."""

    source: str
    lora_cfg: LoRAConfig
    model: Any  # Llama with LoRA filled from the checkpoint
    tokenizer: Any
    meta: dict
    default_slot: str


def _lora_config(run_cfg: dict, where: str) -> LoRAConfig:
    try:
        lora = dict(run_cfg["lora"])
        lora["targets"], lora["slots"] = tuple(lora["targets"]), tuple(lora["slots"])
        return LoRAConfig(**lora)
    except (KeyError, TypeError) as e:
        raise ExportError(f"{where}: bad or missing 'lora' config ({e})") from None


def load_run(
    run_dir: str | Path, *, step: int | None = None, with_base: bool = True
) -> RunAdapters:
    """Rebuild a run's model (float32 base from its source; or shapes only when `with_base` is
    False) and fill its LoRA params from a checkpoint."""
    import jax
    from flax import nnx

    from cmat_jax.model.config import ModelConfig
    from cmat_jax.model.llama import Llama
    from cmat_jax.model.lora import LoRAParam
    from cmat_jax.run_dir import RunDir
    from cmat_jax.training.checkpoint import Checkpointer

    run = RunDir(run_dir)
    cfg = run.read_config()
    where = str(run.config_path)
    source = cfg.get("model")
    if not isinstance(source, str):
        raise ExportError(f"{where}: no 'model' source recorded")
    lora_cfg = _lora_config(cfg, where)
    tokenizer = None
    if with_base:
        from cmat_jax.weights.load import load_model

        model, tokenizer = load_model(source, "float32")
    else:
        model_cfg = ModelConfig.from_hf(_hf_config(source))
        model = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
    model.add_lora(lora_cfg, rngs=nnx.Rngs(0))
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state.to_pure_dict()
    )
    if not run.checkpoint_dir.is_dir():
        raise ExportError(f"{run.path}: no checkpoints to export")
    ckpt = Checkpointer(run.checkpoint_dir, read_only=True)
    try:
        params, meta = ckpt.restore_lora(target, step)
    finally:
        ckpt.close()
    lora_state.replace_by_pure_dict(params)
    nnx.update(model, lora_state)
    return RunAdapters(
        source, lora_cfg, model, tokenizer, meta, cfg.get("slot") or lora_cfg.slots[0]
    )


def _hf_config(source: str) -> dict[str, Any]:
    """The HF config.json dict of a model source (HF dir, GGUF file or preset)."""
    from cmat_jax.weights.registry import resolve_source

    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        from cmat_jax.weights.gguf_io import read_gguf

        return dict(read_gguf(resolved.path).hf_config)
    return dict(resolved.hf_config())


def _np(x: Any, dtype: str) -> np.ndarray:
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(dt))


def peft_tensors(adapters: RunAdapters, slot: str, dtype: str = "float32") -> dict[str, np.ndarray]:
    """PEFT-named adapter tensors: lora_A [r, in], lora_B [out, r] per layer and target."""
    s = adapters.lora_cfg.slot_id(slot)
    if s < 0:
        raise ExportError("--slot: 'none' is the base model and has no adapter")
    out = {}
    for t, (a_LSDR, b_LSRN) in adapters.model.lora.stacked().items():
        a, b = np.asarray(a_LSDR[:, s], np.float32), np.asarray(b_LSRN[:, s], np.float32)
        for layer in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULE[t]}"
            out[f"{prefix}.lora_A.weight"] = _np(a[layer].T, dtype)
            out[f"{prefix}.lora_B.weight"] = _np(b[layer].T, dtype)
    return out


def peft_config(adapters: RunAdapters) -> dict[str, Any]:
    c = adapters.lora_cfg
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapters.source,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": sorted(HF_NAMES[t] for t in c.resolved_targets()),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def merged_tensors(
    adapters: RunAdapters, slot: str, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """HF-named weights of the base with `slot` folded in (Linear weights as [out, in])."""
    from cmat_jax.model.lora import merged_weights
    from cmat_jax.weights.load import HF_LAYER_NAMES

    if adapters.lora_cfg.slot_id(slot) < 0:
        raise ExportError("--slot: 'none' is the base model; export the base itself instead")
    model = adapters.model
    merged = merged_weights(model, slot)
    out = {"model.embed_tokens.weight": _np(model.embed[...], dtype)}
    out["model.norm.weight"] = _np(model.final_norm[...], dtype)
    if model.lm_head is not None:
        out["lm_head.weight"] = _np(np.asarray(model.lm_head[...], np.float32).T, dtype)
    for suffix, (name, transpose) in HF_LAYER_NAMES.items():
        param = getattr(model.layers, name, None)
        if param is None:
            continue  # e.g. biases this architecture does not have
        w = merged[name] if name in merged else np.asarray(param[...], np.float32)
        for layer in range(w.shape[0]):
            out[f"model.layers.{layer}.{suffix}"] = _np(
                w[layer].T if transpose else w[layer], dtype
            )
    return out


def write_tokenizer_files(tokenizer: Any, out: Path, model_max_length: int) -> None:
    """`tokenizer.json` + `tokenizer_config.json` (special tokens, chat template) that
    transformers' `AutoTokenizer` loads, from our Tokenizer (e.g. one read from GGUF metadata)."""
    # The tokenizers backend and special-token strings (Tokenizer has no public save API yet).
    tokenizer._tok.save(str(out / "tokenizer.json"))
    special = {k: v for k, v in tokenizer._special_strings.items() if v is not None}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos,
        "model_max_length": int(model_max_length),
        **special,
    }
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _save_tokenizer(adapters: RunAdapters, out: Path) -> None:
    """Copy the source's tokenizer files; for a GGUF source write them from its metadata."""
    from cmat_jax.weights.registry import resolve_source

    resolved = resolve_source(adapters.source)
    if resolved.kind == "hf_dir":
        for name in _TOKENIZER_FILES:
            if (resolved.path / name).is_file():
                shutil.copy2(resolved.path / name, out / name)
        return
    write_tokenizer_files(adapters.tokenizer, out, adapters.model.config.max_position_embeddings)


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def export(args: ExportArgs) -> Path:
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out}: output directory already exists (refusing to overwrite)")
    run = Path(args.run)
    if not run.is_dir():
        raise ExportError(f"--run: {run}: no such run directory")
    adapters = load_run(run, step=args.step, with_base=args.format == "merged")
    slot = args.slot or adapters.default_slot
    if slot not in adapters.lora_cfg.slots:
        raise ExportError(
            f"--slot: {slot!r} is not an adapter slot of this run "
            f"(slots: {', '.join(adapters.lora_cfg.slots)})"
        )
    if args.format == "peft":
        tensors, files = peft_tensors(adapters, slot, args.dtype), "adapter_model.safetensors"
    else:
        tensors, files = merged_tensors(adapters, slot, args.dtype), "model.safetensors"
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_safetensors(tensors, tmp / files)
    if args.format == "peft":
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(adapters), indent=2) + "\n")
    else:
        hf_cfg = _hf_config(adapters.source)
        hf_cfg.update(torch_dtype=args.dtype, dtype=args.dtype)
        hf_cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        _save_tokenizer(adapters, tmp)
    info = {"run": str(run.resolve()), "slot": slot, "step": adapters.meta.get("step")}
    (tmp / "cmat_jax_export.json").write_text(json.dumps(info, indent=2) + "\n")
    tmp.rename(out)  # the out dir appears only once complete
    return out


def main(argv: list[str] | None = None) -> Path:
    import tyro

    args = tyro.cli(ExportArgs, args=argv, prog="python -m cmat_jax.export")
    out = export(args)
    print(out)
    return out


if __name__ == "__main__":
    run_cli(main)
