"""Logical-axis rules, mesh validation, and 1 device vs 8 CPU devices giving the same training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import Llama
from cmat_jax.model.lora import LoRAConfig, LoRAParam
from cmat_jax.sharding import (
    MeshConfig,
    ShardingError,
    batch_spec,
    logical_to_spec,
    state_specs,
    validate,
)

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def test_rules_map_logical_axes_to_mesh_axes():
    assert logical_to_spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    # fsdp already shards the batch, so an activation's embed dim is not sharded again.
    assert logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)
    assert batch_spec(1) == P(("data", "fsdp"))
    with pytest.raises(ShardingError, match="'nonsense'"):
        logical_to_spec(("nonsense",))


def test_lora_specs_follow_base_dims_rank_replicated():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=4, slots=("a", "b")), rngs=nnx.Rngs(1))
    _, lora, frozen = nnx.split(model, LoRAParam, ...)
    ls, fs = state_specs(lora)["lora"], state_specs(frozen)
    assert fs["layers"]["wq"] == P(None, "fsdp", "tensor")
    assert fs["layers"]["wo"] == P(None, "tensor", "fsdp")
    assert ls["a"]["q"] == P(None, None, "fsdp", None)  # A: base input dim (embed)
    assert ls["b"]["q"] == P(None, None, None, "tensor")  # B: base output dim (heads)
    assert ls["a"]["down"] == P(None, None, "tensor", None)
    assert ls["b"]["down"] == P(None, None, None, "fsdp")


def test_impossible_meshes_fail_with_clear_messages():
    with pytest.raises(ShardingError, match=r"num_kv_heads=2 .* tensor=4"):
        validate(CFG.replace(num_heads=8), _sizes(2, 1, 4), batch_size=8)
    with pytest.raises(ShardingError, match=r"batch size 6 .* data\*fsdp = 2\*2 = 4"):
        validate(CFG, _sizes(2, 2, 2), batch_size=6)
    with pytest.raises(ShardingError, match="micro-batch 2 with accum_steps=4"):
        validate(CFG, _sizes(2, 2, 2), batch_size=8, accum_steps=4)
    with pytest.raises(ShardingError, match="vocab_size=63"):
        validate(CFG.replace(vocab_size=63), _sizes(1, 1, 2))
    with pytest.raises(ShardingError, match=r"hidden_size=32 .* fsdp=3"):
        validate(CFG, _sizes(1, 3, 1))
    validate(CFG, _sizes(2, 2, 2), batch_size=8, accum_steps=2)  # fine


def _sizes(data: int, fsdp: int, tensor: int) -> MeshConfig:
    return MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


def test_mesh_config_shapes():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig().shape(8) == (8, 1, 1)
    with pytest.raises(ShardingError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ShardingError, match="= 4 but 8 devices"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ShardingError, match="not divisible"):
        MeshConfig(data=-1, fsdp=3).shape(8)


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from cmat_jax.model.config import ModelConfig
    from cmat_jax.model.llama import Llama
    from cmat_jax.model.lora import LoRAConfig
    from cmat_jax.sharding import MeshConfig, make_mesh, validate
    from cmat_jax.training.step import OptimConfig, init_train_state, make_optimizer, make_train_step

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(**json.loads(sys.argv[1]))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=4, slots=("assistant", "checker")), rngs=nnx.Rngs(1))
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1), total_steps=5)
    graphdef, frozen, state0 = init_train_state(model, opt, seed=0, base_dtype="float32")
    rng = np.random.default_rng(0)
    B, T = 8, 16
    batches = [dict(
        inputs=rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
        targets=rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
        loss_mask=rng.random((B, T)) < 0.8,
        segment_ids=np.repeat(np.array([[1] * 10 + [2] * 6]), B, 0).astype(np.int32),
        positions=np.repeat(np.array([list(range(10)) + list(range(6))]), B, 0).astype(np.int32),
        adapter_ids=(np.arange(B) % 3 - 1).astype(np.int32),
    ) for _ in range(5)]
    out = {}
    for name, mesh_cfg in [("single", None), ("2x2x2", (2, 2, 2)), ("8x1x1", (8, 1, 1))]:
        mesh = None
        if mesh_cfg is not None:
            mc = MeshConfig(*mesh_cfg)
            validate(cfg, mc, B)
            mesh = make_mesh(mc)
        step = make_train_step(graphdef, opt, mesh=mesh)
        state = jax.tree.map(lambda x: jax.numpy.array(x), state0)
        losses = []
        for b in batches:
            state, m = step(state, frozen, b)
            losses.append(float(m["loss"]))
        spec = None
        if mesh is not None:
            spec = str(state.params["lora"]["b"]["q"].sharding.spec)
        out[name] = dict(losses=losses, b_q_spec=spec,
                         b_q=np.asarray(state.params["lora"]["b"]["q"]).ravel()[:64].tolist())
    # The activation hook: a no-op without a mesh, a sharding constraint under one.
    from cmat_jax.sharding import constrain
    x = np.ones((8, 4, 32), np.float32)
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "embed")))
    out["no_mesh_ok"] = bool((np.asarray(f(x)) == 2).all())
    with jax.set_mesh(make_mesh(MeshConfig(2, 2, 2))):
        spec = tuple(f(x).sharding.spec)
        out["constrained_spec"] = str(spec + (None,) * (3 - len(spec)))
    print(json.dumps(out))
    """
)


def test_one_device_and_8_device_meshes_train_identically(tmp_path):
    script = tmp_path / "mesh_run.py"
    script.write_text(_SCRIPT)
    cfg = {
        k: getattr(CFG, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        )
    }
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = out["single"]["losses"]
    assert len(ref) == 5 and len(set(ref)) == 5
    for name in ("2x2x2", "8x1x1"):
        for a, b in zip(out[name]["losses"], ref, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (name, out[name]["losses"], ref)
        for a, b in zip(out[name]["b_q"], out["single"]["b_q"], strict=True):
            assert abs(a - b) <= 1e-4 * max(abs(b), 1e-3), name
    assert out["2x2x2"]["b_q_spec"] == str(P(None, None, None, "tensor"))
    assert out["8x1x1"]["b_q_spec"] == str(P(None, None, None, "tensor"))
    assert out["no_mesh_ok"]
    assert out["constrained_spec"] == str((("data", "fsdp"), None, None))
