"""Streaming reader for HF safetensors checkpoints (single file, model dir, or sharded index).

Yields HF-named numpy tensors one at a time in the file's dtype (bf16 as ``ml_dtypes.bfloat16``).
Every file's header is parsed and checked against the file size before any tensor data is read,
so truncated downloads and wrong files fail with one line naming the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from cmat_jax.weights.errors import WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _read_header(file: Path) -> list[_TensorEntry]:
    """Parse and validate one safetensors header; entries sorted by data offset."""
    if not file.is_file():
        raise WeightsError(f"{file}: safetensors file not found")
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{file}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise WeightsError(
                f"{file}: not a safetensors file or truncated (header length {header_len}, "
                f"file size {size})"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{file}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: not a safetensors file (header is not a JSON object)")

    data_start = 8 + header_len
    entries: list[_TensorEntry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file}: malformed header entry for tensor {name!r}") from None
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise WeightsError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise WeightsError(
                f"{file}: tensor {name!r} has data_offsets [{begin}, {end}] that do not match "
                f"shape {list(shape)} {dtype_name}"
            )
        entries.append(_TensorEntry(name, dtype, shape, data_start + begin, data_start + end))

    needed = max((e.end for e in entries), default=data_start)
    if needed > size:
        raise WeightsError(
            f"{file}: truncated: header needs {needed} bytes, file has {size} "
            "(incomplete download?)"
        )
    entries.sort(key=lambda e: e.begin)
    return entries


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at ``path``, in index order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such safetensors file or model directory")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = list(dict.fromkeys(str(v) for v in weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(
                f"{index}: not a safetensors index (needs 'weight_map': {e})"
            ) from None
        files = [path / s for s in shards]
        for s, f in zip(shards, files, strict=True):
            if not f.is_file():
                raise WeightsError(f"{index}: names shard {s!r}, which is missing from {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise WeightsError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in this directory")


def _check_index(path: Path, headers: dict[Path, list[_TensorEntry]]) -> None:
    """For a sharded dir, every tensor the index names must be in the shard it points at."""
    index = path / INDEX_FILE
    if not (path.is_dir() and index.is_file()):
        return
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    names = {f.name: {e.name for e in entries} for f, entries in headers.items()}
    for tensor, shard in weight_map.items():
        if tensor not in names[Path(shard).name]:
            raise WeightsError(f"{index}: tensor {tensor!r} is not in shard {shard!r}")


def _headers(path: Path) -> dict[Path, list[_TensorEntry]]:
    headers = {f: _read_header(f) for f in _shard_files(Path(path))}
    _check_index(Path(path), headers)
    return headers


def safetensors_names_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Tensor name -> (shape, dtype) from the headers only; no tensor data is read."""
    return {e.name: (e.shape, e.dtype) for entries in _headers(path).values() for e in entries}


def _read_raw(file: Path, entry: _TensorEntry) -> np.ndarray:
    """Read one tensor straight from its byte range (for dtypes safe_open cannot give numpy)."""
    count = int(np.prod(entry.shape, dtype=np.int64))
    with file.open("rb") as f:
        f.seek(entry.begin)
        buf = f.read(entry.end - entry.begin)
    if len(buf) != entry.end - entry.begin:
        raise WeightsError(f"{file}: truncated while reading tensor {entry.name!r}")
    return np.frombuffer(buf, dtype=entry.dtype, count=count).reshape(entry.shape)


def iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every tensor of the checkpoint, one alive at a time.

    ``path``: a dir with ``model.safetensors`` or ``model.safetensors.index.json`` (+ shards),
    or a single ``.safetensors`` file. All headers are validated before the first tensor.
    """
    for file, entries in _headers(Path(path)).items():
        with safe_open(str(file), framework="numpy") as f:
            for entry in entries:
                try:
                    arr = f.get_tensor(entry.name)
                except Exception:  # older safetensors refuse bf16/fp8 for numpy
                    arr = None
                if arr is None or arr.dtype != entry.dtype or arr.shape != entry.shape:
                    arr = _read_raw(file, entry)
                yield entry.name, arr
