"""Checkpoints: round trip, keep-N, incomplete saves, adapter-only size, sharded restore."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama
from cmat_jax.model.lora import LoRAConfig
from cmat_jax.training.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    completed_steps,
)
from cmat_jax.training.step import OptimConfig, init_train_state, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


@functools.cache
def _state(rank: int = 4, seed: int = 0, steps: int = 2):
    """(Cached: compiled once per module.) A train state after `steps` real optimizer steps (nonzero B, nonzero Adam moments)."""
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    model.add_lora(LoRAConfig(rank=rank, slots=("assistant", "checker")), rngs=nnx.Rngs(1))
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
    graphdef, frozen, state = init_train_state(model, opt, seed, base_dtype="float32")
    step = make_train_step(graphdef, opt, donate=False)
    rng = np.random.default_rng(seed)
    B, T = 2, 16
    batch = {
        "inputs": rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32),
        "loss_mask": np.ones((B, T), bool),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "adapter_ids": np.array([0, 1], np.int32),
    }
    for _ in range(steps):
        state, _ = step(state, frozen, batch)
    return state, frozen


def _assert_trees_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_round_trip_keep_n_and_latest(tmp_path):
    state, _ = _state()
    assert int(state.step) == 2
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(state.params)) > 0
    data_state = {"version": 1, "batches": 7, "mixer": {"draws": [1, 2]}}
    with Checkpointer(tmp_path / "ck", CheckpointConfig(every=2, keep=2)) as ck:
        assert ck.latest_step() is None
        assert ck.save(state, data_state=data_state, meta={"model": "m"})
        assert not ck.save(state._replace(step=state.step + 1), data_state=data_state)  # 3 % 2
        for s in (4, 6):
            ck.save(state._replace(step=state.step * 0 + s), data_state={"batches": s})
        ck.wait()
        assert ck.all_steps() == [4, 6]  # keep=2 deleted step 2
        assert ck.save(state._replace(step=state.step * 0 + 7), force=True)
    assert completed_steps(tmp_path / "ck") == [6, 7]

    with Checkpointer(tmp_path / "ck") as ck:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored, data, meta = ck.restore(target, step=6)
        assert data == {"batches": 6} and meta["step"] == 6
        assert int(restored.step) == 6
        _assert_trees_equal(restored._replace(step=state.step), state)
        latest, _, _ = ck.restore(state)  # newest complete = 7; a concrete target works too
        assert int(latest.step) == 7
        with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
            ck.restore(state, step=5)


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    state, _ = _state()
    root = tmp_path / "ck"
    with Checkpointer(root, CheckpointConfig(every=1)) as ck:
        ck.save(state, data_state={"batches": 1})
    # What a SIGKILL during an async save leaves behind: orbax's temporary step directory.
    partial = root / "3.orbax-checkpoint-tmp-1234567"
    (partial / "lora").mkdir(parents=True)
    (partial / "lora" / "junk").write_bytes(b"\0" * 100)
    assert completed_steps(root) == [2]
    with Checkpointer(root) as ck:
        assert ck.latest_step() == 2
        restored, data, _ = ck.restore(state)
        assert data == {"batches": 1}
        _assert_trees_equal(restored, state)
    assert not partial.exists()


def test_adapter_only_checkpoint_is_small(tmp_path, caplog):
    state, frozen = _state()
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(state, force=True)
    step_dir = tmp_path / "ck" / "2"
    lora_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    assert _bytes(step_dir / "lora") < 2 * lora_bytes + 64_000
    assert _bytes(step_dir) < base_bytes / 2  # the frozen base is not in it
    with caplog.at_level("WARNING"), Checkpointer(tmp_path / "ck", read_only=True) as ck:
        lora, meta = ck.restore_lora()
    _assert_trees_equal(lora, state.params)
    assert meta["step"] == 2
    assert "read only" not in caplog.text  # orbax's notice on every read-only open is dropped


def test_mismatched_config_is_a_clear_error(tmp_path):
    state, _ = _state()
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(state, force=True)
    other, _ = _state(rank=8, steps=0)
    with (
        Checkpointer(tmp_path / "ck") as ck,
        pytest.raises(CheckpointError, match="does not match"),
    ):
        ck.restore(other)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "missing", read_only=True)
    with pytest.raises(CheckpointError, match=r"checkpoint\.every"):
        CheckpointConfig(every=0)


_SHARDED = textwrap.dedent(
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from cmat_jax import sharding as shd
    from cmat_jax.training.checkpoint import Checkpointer
    from cmat_jax.model.llama import Llama
    from cmat_jax.model.lora import LoRAConfig
    from cmat_jax.training.step import OptimConfig, make_optimizer, split_model, state_specs
    from tests.test_checkpoint import CFG, _assert_trees_equal, _state

    assert jax.device_count() == 4
    state, frozen = _state()
    with Checkpointer("{root}") as ck:  # saved from one device's arrays
        ck.save(state, data_state={{"batches": 2}}, force=True)

    model = Llama(CFG, rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=4, slots=("assistant", "checker")), rngs=nnx.Rngs(1))
    graphdef, _, _ = split_model(model, "float32")
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
    specs, _ = state_specs(graphdef, opt, state, frozen)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=2))
    shardings = shd.named(mesh, specs)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    with Checkpointer("{root}") as ck:
        restored, data, _ = ck.restore(target)
    assert data == {{"batches": 2}}
    _assert_trees_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert got.sharding == want, (got.sharding, want)
    a_q = restored.params["lora"]["a"]["q"]  # [L, S, embed, rank]: embed over fsdp
    assert isinstance(a_q.sharding, NamedSharding) and a_q.sharding.spec[2] == "fsdp"
    assert a_q.addressable_shards[0].data.shape[2] == CFG.hidden_size // 2
    print("OK")
    """
)


def test_restore_onto_a_mesh_in_a_4_device_process(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=str(REPO),
    )
    code = _SHARDED.format(root=tmp_path / "ck")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
