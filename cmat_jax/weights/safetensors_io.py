"""HF safetensors checkpoints (single file, model dir, or sharded index) read through `safe_open`.

`SafetensorsCheckpoint` gives random access by tensor name and slice: `read(name, index)` reads
only the bytes of that slice from the memory-mapped shard, so a sharded load reads each device's
part of each tensor and never a whole model. Every shard's header is parsed (and checked against
the file size by `safe_open`) and the index is checked before any tensor data is read, so
truncated downloads and wrong files fail with one line naming the file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from cmat_jax.textfile import read_json
from cmat_jax.weights.errors import WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at ``path``, in index order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such safetensors file or model directory")
    index = path / INDEX_FILE
    if index.is_file():
        shards = list(dict.fromkeys(_weight_map(index).values()))
        files = [path / s for s in shards]
        for s, f in zip(shards, files, strict=True):
            if not f.is_file():
                raise WeightsError(f"{index}: names shard {s!r}, which is missing from {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise WeightsError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in this directory")


def _weight_map(index: Path) -> dict[str, str]:
    raw = read_json(index, WeightsError)
    try:
        weight_map = raw["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index}: not a safetensors index (needs 'weight_map': {e})") from None


class SafetensorsCheckpoint:
    """The tensors of one checkpoint by HF name: shapes from the headers, data by slice.

    Use as a context manager (or call `close`): the shard files stay memory-mapped while open.
    """

    def __init__(self, path: Path | str):
        path = Path(path)
        self.path = path
        self._files = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}  # tensor name -> its shard's safe_open handle
        self._where: dict[str, Path] = {}  # tensor name -> shard file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors dtype names ("BF16", "F32", ...)
        try:
            for file in _shard_files(path):
                handle = self._open(file)
                for name in handle.keys():  # noqa: SIM118 (the handle is not iterable)
                    view = handle.get_slice(name)
                    self._handles[name], self._where[name] = handle, file
                    self.shapes[name] = tuple(int(d) for d in view.get_shape())
                    self.dtypes[name] = view.get_dtype()
            self._check_index()
        except BaseException:
            self.close()
            raise

    def _open(self, file: Path) -> Any:
        if not file.is_file():
            raise WeightsError(f"{file}: safetensors file not found")
        try:
            return self._files.enter_context(safe_open(str(file), framework="numpy"))
        except SafetensorError as e:
            raise WeightsError(
                f"{file}: not a safetensors file or truncated (incomplete download?): {e}"
            ) from None

    def _check_index(self) -> None:
        """For a sharded dir, every tensor the index names must be in the shard it points at."""
        index = self.path / INDEX_FILE
        if not (self.path.is_dir() and index.is_file()):
            return
        for tensor, shard in _weight_map(index).items():
            if self._where.get(tensor, Path()).name != Path(shard).name:
                raise WeightsError(f"{index}: tensor {tensor!r} is not in shard {shard!r}")

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The slice ``index`` of tensor ``name`` (the whole tensor for ``()``), as numpy in the
        file's dtype (bf16 as ``ml_dtypes.bfloat16``); only the slice's bytes are read."""
        try:
            return self._handles[name].get_slice(name)[index]
        except (SafetensorError, AttributeError, TypeError) as e:
            # numpy has no dtype for some safetensors dtypes (fp8 without ml_dtypes support).
            raise WeightsError(
                f"{self._where[name]}: tensor {name!r} ({self.dtypes[name]}) cannot be read: {e}"
            ) from None

    def close(self) -> None:
        self._files.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
