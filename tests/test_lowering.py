"""Cross-lowering on a CPU host: the attention kernels and the jitted steps that use them lower
for CUDA and for TPU with JAX's default settings (lowering only, nothing is compiled).

TPU programs are lowered under an `AbstractMesh` of abstract TPU devices (Mosaic reads the chip
generation from it); CUDA programs under one of abstract CUDA devices. The dispatcher reads the
target platform from that mesh, so the steps get the platform's kernel. Each step test asserts
that the kernel's custom call is there, that every kernel call sits inside a `shard_map`
(`sdy.manual_computation`) whose operands are split over batch and heads, so each device runs
it on its own shard and no full q/k/v reaches it, and that no XLA attention fallback (a
[T, T] score tensor) is in the program. That the partitioner adds no all-gather of q/k/v
around it is checked on a compiled 8-device CPU program in test_attention_mesh.py.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cmat_jax_kernels.decode import decode_attention_pallas
from cmat_jax_kernels.flash_gpu import flash_attention_gpu
from cmat_jax_kernels.flash_tpu import flash_attention_tpu
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmat_jax import sharding as shd
from cmat_jax.inference import generate
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import KVCache, Llama
from cmat_jax.model.lora import LoRAConfig

KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
DEVICES = {
    "cuda": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"),
    "tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}
TPU_KINDS = ("TPU v5 lite", "TPU v6 lite", "TPU v4", "TPU v5p")
T = 72  # odd enough to need padding on every backend; a "72x72" tensor would be XLA scores
CFG = ModelConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    param_dtype="bfloat16",
    compute_dtype="bfloat16",
    attention_impl="pallas",
)


def _mesh(platform: str, shape=(2, 2, 2), device: AbstractDevice | None = None) -> AbstractMesh:
    return AbstractMesh(shape, shd.MESH_AXES, abstract_device=device or DEVICES[platform])


def _lower(fn, args, platform: str, mesh: AbstractMesh) -> str:
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text: str, platform: str) -> int:
    return len(re.findall(rf"custom_call @{re.escape(KERNEL_CALL[platform])}\(", text))


def _manual_regions(text: str) -> list[tuple[str, str]]:
    """(header, body) of every sdy.manual_computation (shard_map) in a lowered module."""
    lines = text.splitlines()
    regions = []
    for i, line in enumerate(lines):
        if "sdy.manual_computation(" not in line:
            continue
        indent = line[: len(line) - len(line.lstrip())]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(indent + "}"))
        regions.append((line, "\n".join(lines[i + 1 : end])))
    return regions


def _assert_kernels_per_shard(text: str, platform: str, operand_spec: str) -> None:
    """Every kernel call is inside a shard_map that splits its operands by `operand_spec`."""
    total = _kernel_calls(text, platform)
    assert total > 0, f"no {KERNEL_CALL[platform]} custom call: the kernel was not used"
    inside = 0
    for header, body in _manual_regions(text):
        n = _kernel_calls(body, platform)
        if n:
            assert operand_spec in header, header[:600]
            assert 'manual_axes={"data", "fsdp", "tensor"}' in header, header[-300:]
            inside += n
    assert inside == total, f"{total - inside} kernel calls outside shard_map"
    assert not re.search(rf"tensor<[0-9x]*\b{T}x{T}x", text), "XLA [T, T] attention scores"


# ----------------------------------------------------------------------------- kernels


def _fwd_bwd(attn):
    def f(q, k, v):
        o, vjp = jax.vjp(attn, q, k, v)
        return (o, *vjp(o))

    return f


def _qkv(B, T_, H, K, D, dtype=jnp.bfloat16):
    return (
        jax.ShapeDtypeStruct((B, T_, H, D), dtype),
        jax.ShapeDtypeStruct((B, T_, K, D), dtype),
        jax.ShapeDtypeStruct((B, T_, K, D), dtype),
    )


# (B, T, H, K, D, segments): head dims 64/128 (and 80, padded to 128 on GPU), GQA, odd T.
KERNEL_SHAPES = [
    (2, 100, 4, 4, 64, False),
    (1, 257, 8, 2, 128, True),
    (2, 64, 6, 2, 80, True),
    (1, 1000, 8, 1, 128, False),
]


@pytest.mark.parametrize(("B", "T_", "H", "K", "D", "segments"), KERNEL_SHAPES)
def test_gpu_flash_kernel_lowers_for_cuda(B, T_, H, K, D, segments):
    seg = jax.ShapeDtypeStruct((B, T_), jnp.int32) if segments else None

    def f(q, k, v, seg):
        attn = lambda q, k, v: flash_attention_gpu(q, k, v, segment_ids_BT=seg)
        return _fwd_bwd(attn)(q, k, v)

    text = _lower(f, (*_qkv(B, T_, H, K, D), seg), "cuda", _mesh("cuda", (1, 1, 1)))
    assert _kernel_calls(text, "cuda") == 3  # forward, dq, dk/dv
    assert text.count("num_stages = 2 : i32, num_warps = 4 : i32") == 3  # launch.TRITON_PARAMS
    assert "platform_index" not in text and "stablehlo.while" not in text  # nothing interpreted


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize(("B", "T_", "H", "K", "D", "segments"), KERNEL_SHAPES[:3])
def test_tpu_flash_kernel_lowers_for_tpu(kind, B, T_, H, K, D, segments):
    seg = jax.ShapeDtypeStruct((B, T_), jnp.int32) if segments else None
    cores = 2 if kind in ("TPU v4", "TPU v5p") else 1  # megacore chips
    mesh = _mesh(
        "tpu", (1, 1, 1), AbstractDevice(device_kind=kind, num_cores=cores, platform="tpu")
    )

    def f(q, k, v, seg):
        attn = lambda q, k, v: flash_attention_tpu(q, k, v, segment_ids_BT=seg)
        return _fwd_bwd(attn)(q, k, v)

    text = _lower(f, (*_qkv(B, T_, H, K, D), seg), "tpu", mesh)
    assert _kernel_calls(text, "tpu") == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(("H", "K", "D", "S"), [(8, 2, 128, 1024), (4, 4, 64, 200), (9, 3, 80, 64)])
def test_decode_kernel_lowers(platform, H, K, D, S):
    B = 3
    args = (
        jax.ShapeDtypeStruct((B, H, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, K, S, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, K, S, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((B,), jnp.int32),
        jax.ShapeDtypeStruct((B,), jnp.int32),
    )
    target = "tpu" if platform == "tpu" else "gpu"

    def f(q, k, v, start, end):
        return decode_attention_pallas(q, k, v, kv_start_B=start, kv_end_B=end, target=target)

    text = _lower(f, args, platform, _mesh(platform, (1, 1, 1)))
    assert _kernel_calls(text, platform) == 1


@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
def test_auto_attention_picks_the_platform_kernel(platform):
    """impl="auto": the flash kernel on TPU; on CUDA cuDNN first, whose checks need a real GPU,
    so lowered from a CPU host it falls back to the Triton kernel; the chunked path on CPU."""
    from cmat_jax.model.attention import attention

    f = _fwd_bwd(lambda q, k, v: attention(q, k, v, impl="auto"))
    device = DEVICES.get(
        platform, AbstractDevice(device_kind="cpu", num_cores=None, platform="cpu")
    )
    text = _lower(f, _qkv(2, 128, 8, 2, 128), platform, _mesh(platform, (1, 1, 1), device))
    if platform == "cpu":
        assert "custom_call" not in text and "stablehlo.while" in text  # chunked's loops
    else:
        assert _kernel_calls(text, platform) == 3


# ----------------------------------------------------------------------------- steps


def _tools_module(name: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def lower_step(kind: str, cfg: ModelConfig, mesh: AbstractMesh, platform: str) -> str:
    """The jitted LoRA train step ("train") or CMAT step ("cmat") on abstract inputs sharded
    over `mesh`, lowered for `platform`. The one place that knows the step-building API."""
    aot_memory = _tools_module("aot_memory")
    from cmat_jax.cmat.loss import CMATLoss, LossConfig
    from cmat_jax.training.step import OptimConfig, make_optimizer, make_train_step

    optimizer = make_optimizer(OptimConfig(), 100)
    lora = LoRAConfig(rank=4, targets=("q", "k", "v", "o"))
    graphdef, frozen, state = aot_memory.abstract_state(cfg, lora, optimizer)
    if kind == "train":
        step = make_train_step(graphdef, optimizer, mesh)
    else:
        loss = CMATLoss(LossConfig(mode="ppo", kl_coef=0.05))
        step = make_train_step(graphdef, optimizer, mesh, loss=loss)
    batch = aot_memory.abstract_batch(8, T, cmat=kind == "cmat")
    shardings = step.shardings(state, frozen, batch)
    args = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        (state, frozen, batch),
        shardings,
    )
    with jax.sharding.use_abstract_mesh(mesh):
        jitted = step._compile(state, frozen, batch)
        return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text()


QKV_SPEC = '[{"data", "fsdp"}, {}, {"tensor"}, {}]'  # [B, T, heads, D]: batch, heads split
CACHE_SPEC = '[{"data", "fsdp"}, {"tensor"}, {}, {}]'  # [B, K, S, D] cache of one layer


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("kind", ["train", "cmat"])
def test_step_lowers_with_sharded_flash_kernel(kind, platform):
    text = lower_step(kind, CFG, _mesh(platform), platform)
    _assert_kernels_per_shard(text, platform, QKV_SPEC)
    # forward, dq and dk/dv kernels; the layer scan holds one copy of each (plus remat's)
    assert _kernel_calls(text, platform) >= 3
    assert "tensor<2x72x2x64xbf16>" in text  # q of one device: 8/4 rows, 4/2 heads


@pytest.mark.parametrize(
    ("recipe", "platform"), [("llama2-7b-v5e-8", "tpu"), ("llama2-7b-h100x8", "cuda")]
)
@pytest.mark.parametrize("kind", ["train", "cmat"])
def test_7b_recipe_steps_lower_with_kernels_per_shard(kind, recipe, platform):
    """The 7B recipes' own model (head_dim 128, 32 heads) and mesh (fsdp = 8 devices) with the
    kernel their hardware runs; 2 of the 32 layers (the layer scan lowers the same either way)."""
    r = _tools_module("aot_memory").load_recipes().get(recipe)
    cfg = r.model_config(num_layers=2)
    assert cfg.attention_impl == "pallas" and cfg.head_dim == 128
    mesh = _mesh(platform, r.mesh.build().shape(r.hw.devices))
    text = lower_step(kind, cfg, mesh, platform)
    _assert_kernels_per_shard(text, platform, '[{"fsdp"}, {}, {}, {}]')  # rows over 8 devices


def lower_decode_step(cfg: ModelConfig, mesh: AbstractMesh, platform: str, B=8, S=256, N=16):
    """The Generator's decode program (`generate._decode`: the while loop of one-token steps)
    on abstract params and decode state sharded over `mesh`, lowered for `platform`."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    params = jax.eval_shape(generate._ParamCache(), params)
    pure = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        params.to_pure_dict(),
        shd.state_specs(params),
    )
    nnx.replace_by_pure_dict(params, pure)

    def at(shape, dtype, spec=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or P()))

    rows = shd.batch_spec(1)
    kv = at(
        (cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim),
        jnp.uint16,
        generate.cache_spec(mesh),
    )
    state = generate.DecodeState(
        cache=KVCache(kv, kv, at((B,), jnp.int32, rows), at((), jnp.int32)),
        last_B=at((B,), jnp.int32, rows),
        tokens_BN=at((B, N), jnp.int32, shd.batch_spec(2)),
        logp_BN=at((B, N), jnp.float32, shd.batch_spec(2)),
        length_B=at((B,), jnp.int32, rows),
        finish_B=at((B,), jnp.int32, rows),
        step=at((), jnp.int32),
        key=jax.eval_shape(lambda: jax.random.key(0)),
    )
    sampling = generate.SamplingArrays(
        *(at((B,), dt, rows) for dt in (jnp.float32, jnp.int32, jnp.float32))
    )
    args = (graphdef, params, state, None, at((8,), jnp.int32), at((B,), jnp.int32, rows))
    args += (at((), jnp.int32), sampling)
    with jax.sharding.use_abstract_mesh(mesh):
        traced = generate._decode.trace(*args, mesh=mesh)
        return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_decode_step_lowers_with_sharded_decode_kernel(platform):
    text = lower_decode_step(CFG, _mesh(platform), platform)
    _assert_kernels_per_shard(text, platform, CACHE_SPEC)
    assert _kernel_calls(text, platform) == 1  # one decode kernel in the layer scan body


def test_without_a_mesh_the_platform_is_the_default_backend():
    from cmat_jax.model.attention import target_platform

    assert target_platform() == jax.default_backend() == "cpu"
    with jax.sharding.use_abstract_mesh(_mesh("tpu")):
        assert target_platform() == "tpu"
    with jax.sharding.use_abstract_mesh(_mesh("cuda")):
        assert target_platform() == "gpu"
    np.testing.assert_equal(_kernel_calls("", "tpu"), 0)
