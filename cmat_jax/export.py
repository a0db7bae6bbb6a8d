"""`python -m cmat_jax.export --model SOURCE --format peft|merged --out DIR [--slot NAME]`.

- `peft`:   `adapter_model.safetensors` + `adapter_config.json` for one adapter slot of a run,
  loadable with `peft.AutoPeftModelForCausalLM.from_pretrained(DIR)`: `base_model_name_or_path`
  is the base's Hugging Face repo id when the run's base is a preset (or the local HF directory
  the run used; `--base-name` overrides it).
- `merged`: an HF checkpoint (`config.json`, `model.safetensors`, tokenizer files) with the slot's
  adapter folded into the base weights, loadable with `transformers`; any base source (a preset,
  an HF dir, a GGUF file) exports as itself with `--slot none`.

SOURCE is a training run directory (its base plus the adapters of its newest complete
checkpoint, or `--step`; see `cmat_jax.run_loader`), a preset, an HF directory or a GGUF file.
The output directory must not exist; it appears only once complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import tyro

from cmat_jax.cli import NonNegInt, UsageError, parse, run_cli
from cmat_jax.model.lora import HF_NAMES
from cmat_jax.run_loader import LoadedModel, hf_config, is_run_dir, load_run, load_source

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
    """A source that cannot be exported as asked; the message names the flag or field."""


@dataclass(frozen=True)
class ExportArgs:
    """Export a training run's adapter as a PEFT adapter, or a model as a merged HF checkpoint."""

    model: Annotated[str, tyro.conf.arg(aliases=("--run",))]
    """A training run directory (written by `python -m cmat_jax.train`), or for --format merged
    also a preset, an HF directory or a .gguf file."""
    out: str
    """Output directory; must not exist yet."""
    format: Literal["peft", "merged"] = "peft"
    """'peft': adapter files for peft; 'merged': an HF checkpoint with the adapter folded in."""
    slot: str | None = None
    """Adapter slot to export (default: the slot the run trained; 'none' = the base model)."""
    step: NonNegInt | None = None
    """Checkpoint step to export (default: the newest complete one)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Tensor dtype written to the safetensors file."""
    base_name: str | None = None
    """--format peft: the adapter's base_model_name_or_path (default: the preset's Hugging Face
    repo id, or the local base directory the run used)."""


def _np(x: Any, dtype: str) -> np.ndarray:
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(dt))


def _adapter_slot(lm: LoadedModel, slot: str | None) -> int:
    if lm.kind != "run":
        raise ExportError(f"--format peft needs a training run directory, got {lm.source}")
    name = lm.slot(slot)
    if name == "none":
        raise ExportError("--slot: 'none' is the base model and has no adapter")
    return lm.lora.slot_id(name)


def peft_tensors(
    lm: LoadedModel, slot: str | None, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """PEFT-named adapter tensors: lora_A [r, in], lora_B [out, r] per layer and target."""
    s = _adapter_slot(lm, slot)
    out = {}
    for t, (a_LSDR, b_LSRN) in lm.model.lora.stacked().items():
        a, b = np.asarray(a_LSDR[:, s], np.float32), np.asarray(b_LSRN[:, s], np.float32)
        for layer in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULE[t]}"
            out[f"{prefix}.lora_A.weight"] = _np(a[layer].T, dtype)
            out[f"{prefix}.lora_B.weight"] = _np(b[layer].T, dtype)
    return out


def peft_config(lm: LoadedModel, base_name: str | None = None) -> dict[str, Any]:
    """adapter_config.json; ``base_model_name_or_path`` is ``base_name``, else the name HF
    tools know the run's base by (see ``registry.hub_name``)."""
    from cmat_jax.weights.registry import hub_name

    c = lm.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or hub_name(lm.base),
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
    lm: LoadedModel, slot: str | None, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """HF-named weights of the base with ``slot`` folded in (Linear weights as [out, in]);
    slot "none" (a base source's only slot) exports the base weights."""
    from cmat_jax.model.lora import merged_weights
    from cmat_jax.weights.load import HF_LAYER_NAMES

    name = lm.slot(slot)
    model = lm.model
    merged = merged_weights(model, name) if name != "none" else {}
    out = {"model.embed_tokens.weight": _np(model.embed[...], dtype)}
    out["model.norm.weight"] = _np(model.final_norm[...], dtype)
    if model.lm_head is not None:
        out["lm_head.weight"] = _np(np.asarray(model.lm_head[...], np.float32).T, dtype)
    for suffix, (pname, transpose) in HF_LAYER_NAMES.items():
        param = getattr(model.layers, pname, None)
        if param is None:
            continue  # e.g. biases this architecture does not have
        w = merged[pname] if pname in merged else np.asarray(param[...], np.float32)
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


def _save_tokenizer(lm: LoadedModel, out: Path) -> None:
    """Copy the base's tokenizer files; for a GGUF base write them from its metadata."""
    from cmat_jax.weights.registry import resolve_source

    resolved = resolve_source(lm.base)
    if resolved.kind == "hf_dir":
        for name in _TOKENIZER_FILES:
            if (resolved.path / name).is_file():
                shutil.copy2(resolved.path / name, out / name)
        return
    write_tokenizer_files(lm.tokenizer, out, lm.model.config.max_position_embeddings)


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _check_out(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"--out: {out}: already exists (refusing to overwrite)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out: {parent} is not a directory")
            break


def export(args: ExportArgs) -> Path:
    """Write the export; nothing is created before the source has loaded and the slot checked,
    and nothing that exists is touched (the files go to a fresh temporary directory beside
    ``out`` that is renamed to ``out`` once complete)."""
    out = Path(args.out).expanduser()
    _check_out(out)
    if not Path(args.model).expanduser().exists() and args.format == "peft":
        raise ExportError(f"--model: {args.model}: no such run directory")
    if args.format == "peft":
        if not is_run_dir(args.model):
            raise ExportError(f"--format peft needs a training run directory, got {args.model}")
        lm = load_run(args.model, args.step, with_base=False)
        tensors, file = peft_tensors(lm, args.slot, args.dtype), "adapter_model.safetensors"
    else:
        lm = load_source(args.model, args.step, dtype="float32")
        tensors, file = merged_tensors(lm, args.slot, args.dtype), "model.safetensors"
    slot = lm.slot(args.slot)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_safetensors(tensors, tmp / file)
        if args.format == "peft":
            cfg = peft_config(lm, args.base_name)
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            hf_cfg = hf_config(lm.base)
            hf_cfg.update(torch_dtype=args.dtype, dtype=args.dtype)
            hf_cfg.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
            _save_tokenizer(lm, tmp)
        info = {**lm.info(), "slot": slot}
        (tmp / "cmat_jax_export.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.rename(out)  # the out dir appears only once complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone: mkdtemp made it
        raise
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse(
        ExportArgs, argv, prog="python -m cmat_jax.export", description=__doc__.splitlines()[0]
    )
    out = export(args)
    print(out)
    return out


if __name__ == "__main__":
    run_cli(main)
