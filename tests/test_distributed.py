"""Multi-host JAX: 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1) train exactly
like 1 process x 8 devices, and an orbax checkpoint written by the 2-process run restores in
the 1-process run. Plus the pure environment resolution (SLURM, explicit, TPU, single).

The runs are subprocesses of this file (`python tests/test_distributed.py worker ...`):
the device count is fixed by XLA_FLAGS before JAX starts, and `jax.distributed` can be
initialized once per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmat_jax.distributed import (
    DistributedArgs,
    DistributedError,
    first_host,
    resolve,
    slurm_port,
)

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, SEQ, STEPS = 8, 16, 3
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


# ----------------------------------------------------------------------------- the worker


def _global_batch_np(step: int) -> dict[str, np.ndarray]:
    """The same global batch on every process (each one then keeps only its rows)."""
    rng = np.random.default_rng(100 + step)
    tokens = rng.integers(1, 64, size=(GLOBAL_BATCH, SEQ + 1), dtype=np.int32)
    mask = (rng.random((GLOBAL_BATCH, SEQ)) < 0.7).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": mask,
        "segment_ids": np.ones((GLOBAL_BATCH, SEQ), np.int32),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (GLOBAL_BATCH, SEQ)).copy(),
        "adapter_ids": np.zeros((GLOBAL_BATCH,), np.int32),
    }


def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def worker(out: str, ckpt_dir: str, coordinator: str, num_processes: int, process_id: int):
    """Train STEPS steps of a tiny LoRA model on the 8-device mesh, checkpoint, report."""
    from cmat_jax.distributed import initialize_from_env

    plan = initialize_from_env(
        DistributedArgs(
            mode="explicit" if num_processes > 1 else "single",
            coordinator=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            timeout_s=60,
        )
    )
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from cmat_jax.distributed import batch_share, global_batch, is_main_process
    from cmat_jax.model.config import ModelConfig
    from cmat_jax.model.llama import Llama
    from cmat_jax.model.lora import LoRAConfig
    from cmat_jax.sharding import MeshConfig, make_mesh
    from cmat_jax.training.checkpoint import CheckpointConfig, Checkpointer
    from cmat_jax.training.step import (
        OptimConfig,
        init_train_state,
        make_optimizer,
        make_train_step,
    )

    assert jax.process_count() == num_processes and jax.device_count() == 8
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )

    @nnx.jit  # one compile for the whole init instead of one per parameter
    def create() -> Llama:
        model = Llama(cfg, rngs=nnx.Rngs(0))
        model.add_lora(LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
        return model

    model = create()
    mesh = make_mesh(MeshConfig(**MESH))
    optimizer = make_optimizer(OptimConfig(lr=5e-2, warmup_steps=0), 10)
    graphdef, frozen, state = init_train_state(model, optimizer, 0, base_dtype=None)
    step_fn = make_train_step(graphdef, optimizer, mesh, donate=False)

    share = batch_share(mesh, GLOBAL_BATCH)
    rows = slice(share.start, share.start + share.rows)
    losses = []
    for i in range(STEPS):
        local = {k: v[rows] for k, v in _global_batch_np(i).items()}
        state, metrics = step_fn(state, frozen, global_batch(local, mesh))
        losses.append(float(metrics["loss"]))

    report = {
        "plan": plan.kind,
        "share": [share.index, share.count, share.start, share.rows],
        "losses": losses,
    }
    if num_processes > 1:
        with Checkpointer(ckpt_dir, CheckpointConfig(every=1, keep=1)) as ckpt:
            ckpt.save(state, data_state={"position": STEPS}, force=True)
        # The saved state as global host arrays, to compare the restore with.
        full = multihost_utils.process_allgather(state, tiled=True)
        if is_main_process():
            np.savez(Path(ckpt_dir).parent / "saved.npz", **_flat(full))
    else:
        # Restore the 2-process checkpoint onto this process's 8-device mesh.
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        with Checkpointer(ckpt_dir, read_only=True) as ckpt:
            restored, data_state, _ = ckpt.restore(target)
        saved = np.load(Path(ckpt_dir).parent / "saved.npz")
        restored_np = _flat(jax.device_get(restored))
        report["restored_equal"] = sorted(saved.files) == sorted(restored_np) and all(
            np.array_equal(saved[k], restored_np[k]) for k in saved.files
        )
        report["restored_step"] = int(restored.step)
        report["restored_data"] = data_state
        report["restored_sharding_ok"] = all(
            r.sharding == s.sharding
            for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
        )
        # Training continues from the restored state like from this run's own state.
        nxt = global_batch(_global_batch_np(STEPS), mesh)
        _, m_own = step_fn(state, frozen, nxt)
        _, m_restored = step_fn(restored, frozen, nxt)
        report["next_loss"] = [float(m_own["loss"]), float(m_restored["loss"])]
    if is_main_process():
        Path(out).write_text(json.dumps(report))


# ----------------------------------------------------------------------------- the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(devices: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, __file__, "worker", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{out[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    ckpt = tmp / "ckpt"
    coord = f"127.0.0.1:{_free_port()}"
    multi = [
        _spawn(4, str(tmp / "multi.json"), str(ckpt), coord, "2", str(pid)) for pid in range(2)
    ]
    _wait(multi)
    single = _spawn(8, str(tmp / "single.json"), str(ckpt), "", "1", "0")
    _wait([single])
    return (
        json.loads((tmp / "multi.json").read_text()),
        json.loads((tmp / "single.json").read_text()),
    )


def test_two_processes_match_one_process(runs):
    multi, single = runs
    assert multi["plan"] == "explicit" and single["plan"] == "single"
    # Process 0 holds the first half of the global batch; one process holds all of it.
    assert multi["share"] == [0, 2, 0, GLOBAL_BATCH // 2]
    assert single["share"] == [0, 1, 0, GLOBAL_BATCH]
    assert len(multi["losses"]) == STEPS
    # Training moved the loss (LoRA B starts at zero, so step 1 is the base model's loss).
    assert multi["losses"][0] != multi["losses"][-1]
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-6, atol=0)


def test_checkpoint_from_two_processes_restores_in_one(runs):
    _, single = runs
    assert single["restored_step"] == STEPS
    assert single["restored_data"] == {"position": STEPS}
    assert single["restored_sharding_ok"]  # restored onto this run's 8-device layout
    assert single["restored_equal"]  # bit-exact: every field the 2-process run saved
    own, restored = single["next_loss"]
    # The two runs' states differ only by float summation order across processes.
    np.testing.assert_allclose(restored, own, rtol=1e-5)


# --- pure resolution --------------------------------------------------------------------


def test_first_host_parses_slurm_node_lists():
    assert first_host("node001") == "node001"
    assert first_host("node001,host2") == "node001"
    assert first_host("gpu[003-004,7],cpu1") == "gpu003"
    assert first_host("a-b[12,15-16]") == "a-b12"
    with pytest.raises(DistributedError, match="node list"):
        first_host("")


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "3",
    "SLURM_STEP_NODELIST": "h100-[07-08]",
    "SLURM_STEP_NUM_NODES": "2",
}


def test_slurm_one_process_per_gpu():
    plan = resolve(env={**SLURM, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert plan.kind == "slurm"
    assert plan.coordinator == f"h100-07:{slurm_port(4242)}"
    assert (plan.num_processes, plan.process_id) == (16, 3)
    assert plan.local_device_ids == (3,)  # 8 tasks per node, all GPUs visible: pick ours
    bound = resolve(env={**SLURM, "CUDA_VISIBLE_DEVICES": "3"})
    assert bound.local_device_ids is None  # --gpus-per-task=1: SLURM already bound it


def test_slurm_one_process_per_node_and_port_override():
    env = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    plan = resolve(DistributedArgs(port=31337), env=env)
    assert plan.coordinator == "h100-07:31337"
    assert (plan.num_processes, plan.process_id, plan.local_device_ids) == (2, 1, None)


def test_explicit_flags_win_and_env_fallback():
    plan = resolve(
        DistributedArgs(coordinator="10.0.0.1:1234", num_processes=4, process_id=2), env=SLURM
    )
    assert plan == resolve(
        env={
            "CMAT_JAX_COORDINATOR": "10.0.0.1:1234",
            "CMAT_JAX_NUM_PROCESSES": "4",
            "CMAT_JAX_PROCESS_ID": "2",
        }
    )
    assert (plan.kind, plan.coordinator, plan.num_processes, plan.process_id) == (
        "explicit",
        "10.0.0.1:1234",
        4,
        2,
    )


def test_tpu_and_single_detection():
    no_dev: tuple[str, ...] = ()
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t1,t2"}, tpu_device_files=no_dev).kind == "tpu"
    assert resolve(env={}, tpu_device_files=(__file__,)).kind == "tpu"  # a TPU device node
    # A one-task SLURM allocation is just a single process.
    assert resolve(env={**SLURM, "SLURM_NTASKS": "1"}, tpu_device_files=no_dev).kind == "single"
    assert resolve(env={}, tpu_device_files=no_dev).kind == "single"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (DistributedArgs(coordinator="nohost", num_processes=2, process_id=0), "host:port"),
        (DistributedArgs(coordinator="h:1", num_processes=2, process_id=2), "process-id"),
        (DistributedArgs(mode="explicit", coordinator="h:1"), "num-processes"),
        (DistributedArgs(mode="slurm"), "SLURM_NTASKS"),
    ],
)
def test_bad_settings_name_the_flag(args, match):
    with pytest.raises(DistributedError, match=match):
        resolve(args, env={})


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "worker":
    _, _, out, ckpt, coord, n, pid = sys.argv
    worker(out, ckpt, coord, int(n), int(pid))
