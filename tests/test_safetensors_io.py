"""safetensors reader: single file, model dir, sharded index, slices, bf16, header validation."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from cmat_jax.weights.errors import WeightsError
from cmat_jax.weights.safetensors_io import SafetensorsCheckpoint


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsCheckpoint(path) as ckpt:
        return {name: ckpt.read(name) for name in ckpt.shapes}


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float16),
        "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(16).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(16, np.float32),
        "model.norm.weight": rng.standard_normal(16).astype(np.float32),
        "lm_head.weight": rng.standard_normal((32, 16)).astype(np.float32),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr)


def _write_sharded(d: Path, state: dict[str, np.ndarray], n_shards: int = 3) -> None:
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::n_shards]}
        save_file(part, str(d / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def test_single_file_and_dir_round_trip(tmp_path: Path) -> None:
    state = _state(np.random.default_rng(0))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
    _assert_same(_read_all(tmp_path), state)
    _assert_same(_read_all(tmp_path / "model.safetensors"), state)


def test_sharded_round_trip_and_headers(tmp_path: Path) -> None:
    state = _state(np.random.default_rng(1))
    _write_sharded(tmp_path, state)
    _assert_same(_read_all(tmp_path), state)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.shapes == {n: a.shape for n, a in state.items()}
        assert ckpt.dtypes["model.layers.0.self_attn.q_proj.weight"] == "F16"


def test_reads_slices(tmp_path: Path) -> None:
    state = _state(np.random.default_rng(2))
    _write_sharded(tmp_path, state, n_shards=2)
    w = state["lm_head.weight"]
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        got = ckpt.read("lm_head.weight", (slice(8, 16), slice(4, 12)))
        np.testing.assert_array_equal(got, w[8:16, 4:12])
        np.testing.assert_array_equal(
            ckpt.read("model.norm.weight", (slice(2, 5),)), state["model.norm.weight"][2:5]
        )


def test_bf16(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    save_file({"w": x, "f": np.arange(3, dtype=np.int64)}, str(tmp_path / "model.safetensors"))
    got = _read_all(tmp_path)
    assert got["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got["w"].astype(np.float32), x.astype(np.float32))
    np.testing.assert_array_equal(got["f"], np.arange(3))
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert (ckpt.shapes["w"], ckpt.dtypes["w"]) == ((8, 4), "BF16")
        np.testing.assert_array_equal(ckpt.read("w", (slice(2, 4),)), x[2:4])


def test_truncated_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    save_file(_state(np.random.default_rng(4)), str(f))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(
        WeightsError, match=r"model\.safetensors: not a safetensors file or truncated"
    ):
        SafetensorsCheckpoint(tmp_path)


def test_missing_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _state(np.random.default_rng(5)))
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"index\.json: names shard 'model-00002-of-00003"):
        SafetensorsCheckpoint(tmp_path)


def test_index_tensor_not_in_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _state(np.random.default_rng(6)))
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"'model\.extra\.weight' is not in shard"):
        SafetensorsCheckpoint(tmp_path)


def test_not_safetensors_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a safetensors file"):
        SafetensorsCheckpoint(bad)
    with pytest.raises(WeightsError, match=r"nope\.safetensors: no such safetensors file"):
        SafetensorsCheckpoint(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"no model\.safetensors or model\.safetensors\.index"):
        SafetensorsCheckpoint(empty)
