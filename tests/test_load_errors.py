"""Bad input to `load_model`: one-line errors that name the file or field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmat_jax import load_model
from tests.fixtures_hf import save_tiny_model_dir


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


def test_missing_source(tmp_path):
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "nope")
    assert "nope" in _one_line(e.value)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m")
    _edit_config(path, model_type="gpt_neox")
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = _one_line(e.value)
    assert "config.json" in msg and "model_type" in msg and "gpt_neox" in msg


def test_unsupported_config_field(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m")
    _edit_config(path, num_experts=8)
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = _one_line(e.value)
    assert "config.json" in msg and "num_experts" in msg


def test_unsupported_rope_type(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m")
    _edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"config\.json.*rope_parameters\.rope_type.*yarn"):
        load_model(path)


def test_tokenizer_larger_than_embedding(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m", vocab_size=200)  # tokenizer keeps ~259+ ids
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = _one_line(e.value)
    assert str(path) in msg and "embedding" in msg


def test_truncated_safetensors(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert "model.safetensors" in _one_line(e.value)


def test_unsupported_gguf_quant(tmp_path):
    from tests.test_gguf_io import Q, _write_one_tensor_gguf

    f = tmp_path / "q8k.gguf"
    _write_one_tensor_gguf(f, "blk.0.ffn_up.weight", Q.Q8_K)  # a type gguf.quants cannot dequantize
    with pytest.raises(ValueError) as e:
        load_model(f)
    msg = _one_line(e.value)
    assert "q8k.gguf" in msg and "Q8_K" in msg


def test_cli_prints_one_line_without_traceback(tmp_path):
    code = (
        "from cmat_jax.cli import run_cli; from cmat_jax import load_model;"
        f"run_cli(lambda: load_model({str(tmp_path / 'missing')!r}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0], r.stderr
