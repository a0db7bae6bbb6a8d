"""`train cmat` on a device mesh: one CMAT round of a tiny job (rollouts with the Checker and
memory, reference log-probs, the CMAT update) gives the same rollout tokens, losses and adapter
params on a data=2 x fsdp=2 x tensor=2 mesh of 8 CPU devices as on one device, and with two
processes (4 devices each, `jax.distributed` over 127.0.0.1) as with one.

The runs are subprocesses of this file (`python tests/test_cmat_mesh.py worker ...`): the
device count is fixed by XLA_FLAGS before JAX starts.
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

import cmat_jax

# The directory cmat_jax (and tests/) are imported from: the workers import the same code.
ROOT = Path(cmat_jax.__file__).parent.parent
MESH_2X2X2 = {"data": 2, "fsdp": 2, "tensor": 2}
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


# ----------------------------------------------------------------------------- the worker


def worker(model_dir: str, out: str, mesh: str, coordinator: str, num_processes: int, pid: int):
    """One CMAT round of the tiny job on `mesh`; process 0 writes tokens, losses and params."""
    from cmat_jax.distributed import DistributedArgs, initialize_from_env

    initialize_from_env(
        DistributedArgs(
            mode="explicit" if num_processes > 1 else "single",
            coordinator=coordinator,
            num_processes=num_processes,
            process_id=pid,
            timeout_s=120,
        )
    )
    import jax
    from jax.experimental import multihost_utils

    from cmat_jax.cmat.job import CMATJob
    from cmat_jax.cmat.rounds import run_round
    from cmat_jax.cmat.session import CMATRun
    from cmat_jax.tasks import TASKS
    from cmat_jax.train import LoRAArgs, MeshArgs

    job = CMATJob(
        model=model_dir,
        out=str(Path(out) / "run"),
        param_dtype="float32",
        compute_dtype="float32",
        remat="none",
        lora=LoRAArgs(rank=4, alpha=8.0, slots=("assistant", "checker")),
        mesh=MeshArgs(**json.loads(mesh)),
        sft_steps=0,
        rounds=1,
        tasks_per_round=1,
        group_size=2,
        batch_size=4,
        seq_len=768,  # the tiny tokenizer spends ~500 tokens on the first prompt
        max_new_tokens=8,
        train_max_rounds=1,
        max_revisions=1,
        use_reflection=False,
        drop_failed_groups=False,  # a random model fails every group; train its rows anyway
        dev_data="",
        progress=False,
        export=False,
    )
    r = CMATRun(job)
    make_env, close = TASKS["db"].open_envs(job.train_max_rounds)
    try:
        stats, res, hist = run_round(r, 0, {"db": make_env}, [])
    finally:
        close()
    params = r.trainer.state.params
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    flat = {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    }
    report = {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "tokens": [row.tokens.tolist() for row in res.rows],
        "roles": [row.role for row in res.rows],
        "rewards": [e.reward for e in res.episodes],
        "losses": [h["loss"] for h in hist],
        "kl": [h["kl"] for h in hist],
        "rows": stats["rows"],
    }
    r.close()
    if jax.process_index() == 0:
        np.savez(Path(out) / "params.npz", **flat)
        (Path(out) / "report.json").write_text(json.dumps(report))


# ----------------------------------------------------------------------------- the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(devices: int, model_dir: Path, out: Path, mesh: dict, processes: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    coordinator = f"127.0.0.1:{_free_port()}"
    args = [sys.executable, __file__, "worker", str(model_dir), str(out), json.dumps(mesh)]
    procs = [
        subprocess.Popen(
            [*args, coordinator, str(processes), str(pid)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(processes)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, text in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{text[-4000:]}"
    report = json.loads((out / "report.json").read_text())
    report["params"] = dict(np.load(out / "params.npz"))
    return report


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.fixtures_hf import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def one_device(model_dir, tmp_path_factory) -> dict:
    return _run(1, model_dir, tmp_path_factory.mktemp("one"), ONE_DEVICE)


@pytest.fixture(scope="module")
def mesh_8(model_dir, tmp_path_factory) -> dict:
    return _run(8, model_dir, tmp_path_factory.mktemp("mesh"), MESH_2X2X2)


def _assert_same_round(got: dict, want: dict) -> None:
    assert got["rows"] == want["rows"] and got["rows"] >= 3
    assert got["roles"] == want["roles"]
    assert got["tokens"] == want["tokens"]  # the same rollouts, token for token
    assert got["rewards"] == want["rewards"]
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["kl"], want["kl"], rtol=0, atol=1e-5)
    assert sorted(got["params"]) == sorted(want["params"])
    for k in want["params"]:
        np.testing.assert_allclose(
            got["params"][k], want["params"][k], rtol=0, atol=1e-5, err_msg=k
        )


def test_cmat_round_on_a_2x2x2_mesh_equals_one_device(one_device, mesh_8):
    assert one_device["devices"] == 1 and mesh_8["devices"] == 8
    assert "checker" in mesh_8["roles"] and len(mesh_8["losses"]) >= 1
    _assert_same_round(mesh_8, one_device)


def test_cmat_round_with_two_processes_equals_one_process(model_dir, mesh_8, tmp_path):
    two = _run(4, model_dir, tmp_path, MESH_2X2X2, processes=2)
    assert two["devices"] == 8 and two["processes"] == 2
    _assert_same_round(two, mesh_8)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    model, out, mesh, coordinator, n, pid = sys.argv[2:8]
    worker(model, out, mesh, coordinator, int(n), int(pid))
