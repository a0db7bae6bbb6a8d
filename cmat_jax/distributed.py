"""Multi-host JAX: `jax.distributed.initialize` from the environment, process roles, data shares.

One process per host (TPU VM workers, SLURM nodes) or per GPU (SLURM tasks) runs the same
program; JAX's runtime connects them and a `Mesh` over `jax.devices()` spans them all. This
module only decides how to call `jax.distributed.initialize`:

- `explicit`: coordinator `host:port`, process count and id from flags or the environment
  (`CMAT_JAX_COORDINATOR`, `CMAT_JAX_NUM_PROCESSES`, `CMAT_JAX_PROCESS_ID`),
- `slurm`: from SLURM's variables (first host of the step's node list is the coordinator, the
  port is derived from the job id; one process per node sees all its GPUs, one process per GPU
  sees its own),
- `tpu`: a Cloud TPU VM: JAX reads the slice's topology from the TPU metadata itself,
- `jax`: whatever cluster `jax.distributed.initialize()` detects by itself (SLURM with one
  task per GPU, Cloud TPU, Kubernetes, MPI, ...); the SLURM batch script uses this,
- `single`: none of the above — one process, no initialization.

`resolve()` is a pure function of (flags, environment) so every branch is testable without a
cluster; `initialize_from_env()` applies it. Call it before anything touches a JAX device.

Each process feeds only the batch rows its devices hold: `batch_share(mesh, B)` says which
share of the global batch that is, and `global_batch(local, mesh)` assembles the global
`jax.Array`s from every process's rows (`jax.make_array_from_process_local_data`).

Run any entry point multi-host without changing it:

    python -m cmat_jax.distributed [--coordinator H:P --num-processes N --process-id I] train sft ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

ENV_COORDINATOR = "CMAT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "CMAT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CMAT_JAX_PROCESS_ID"
ENV_PORT = "CMAT_JAX_COORDINATOR_PORT"

Mode = Literal["auto", "single", "explicit", "slurm", "tpu", "jax"]
MODES = ("auto", "single", "explicit", "slurm", "tpu", "jax")


class DistributedError(ValueError):
    """A distributed setup that cannot work; the message names the flag or variable."""


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """How this process joins a multi-process JAX run (all optional: 'auto' detects)."""

    mode: Mode = "auto"
    """auto | single | explicit | slurm | tpu | jax ('auto': explicit if a coordinator is
    given, else SLURM if its variables are set, else a Cloud TPU VM, else a single process;
    'jax': `jax.distributed.initialize()` detects the cluster itself)."""
    coordinator: str | None = None
    """host:port of process 0's coordinator service (explicit mode)."""
    num_processes: int | None = None
    """Total number of processes (explicit mode)."""
    process_id: int | None = None
    """This process's id in 0..num_processes-1 (explicit mode)."""
    local_device_ids: tuple[int, ...] | None = None
    """Restrict this process to these local accelerators (default: chosen per mode)."""
    port: int | None = None
    """Coordinator port under SLURM (default: derived from SLURM_JOB_ID)."""
    timeout_s: int = 300
    """Seconds to wait for every process to join."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved `jax.distributed.initialize` arguments (kind 'single': no call)."""

    kind: Literal["single", "explicit", "slurm", "tpu", "jax"]
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------- resolution


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise DistributedError(f"environment variable {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-004,7],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise DistributedError(f"SLURM node list {nodelist!r} has no host name")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0]
    if not first:
        raise DistributedError(f"SLURM node list {nodelist!r}: empty host range")
    return prefix + first


def slurm_port(job_id: int) -> int:
    """A port every task of the job agrees on, spread over 20000..29999 by job id."""
    return 20000 + job_id % 10000


def on_slurm(env: Mapping[str, str]) -> bool:
    return "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env


TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


def on_tpu_vm(env: Mapping[str, str], device_files: Sequence[str] = TPU_DEVICE_FILES) -> bool:
    """A Cloud TPU VM: TPU runtime variables, or a TPU device node (v4: accel, v5+: vfio)."""
    if any(k in env for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")):
        return True
    return any(os.path.exists(f) for f in device_files)


def _slurm_plan(args: DistributedArgs, env: Mapping[str, str]) -> Plan:
    n = _int_var(env, "SLURM_NTASKS")
    pid = _int_var(env, "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedError("environment variable SLURM_STEP_NODELIST is not set")
    port = args.port or (int(env[ENV_PORT]) if ENV_PORT in env else None)
    port = port or slurm_port(_int_var(env, "SLURM_JOB_ID"))
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    local = args.local_device_ids
    if local is None and n > nodes:
        # Several tasks per node = one process per GPU. If SLURM bound one GPU per task
        # (--gpus-per-task=1) the process sees only that GPU; else pick ours by local rank.
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if len(visible) != 1:
            local = (_int_var(env, "SLURM_LOCALID"),)
    return Plan("slurm", f"{first_host(nodelist)}:{port}", n, pid, local)


def _explicit_plan(args: DistributedArgs, env: Mapping[str, str]) -> Plan:
    coord = args.coordinator or env.get(ENV_COORDINATOR)
    n = args.num_processes
    if n is None and ENV_NUM_PROCESSES in env:
        n = _int_var(env, ENV_NUM_PROCESSES)
    pid = args.process_id
    if pid is None and ENV_PROCESS_ID in env:
        pid = _int_var(env, ENV_PROCESS_ID)
    if not coord or ":" not in coord:
        raise DistributedError(
            f"--coordinator (or ${ENV_COORDINATOR}) must be host:port, got {coord!r}"
        )
    if n is None or n < 1:
        raise DistributedError(f"--num-processes (or ${ENV_NUM_PROCESSES}) must be >= 1, got {n}")
    if pid is None or not 0 <= pid < n:
        raise DistributedError(
            f"--process-id (or ${ENV_PROCESS_ID}) must be in 0..{n - 1}, got {pid}"
        )
    return Plan("explicit", coord, n, pid, args.local_device_ids)


def resolve(
    args: DistributedArgs | None = None,
    env: Mapping[str, str] | None = None,
    *,
    tpu_device_files: Sequence[str] = TPU_DEVICE_FILES,
) -> Plan:
    """The initialization plan for these flags in this environment (no side effects)."""
    args = args or DistributedArgs()
    env = os.environ if env is None else env
    if args.mode not in MODES:
        raise DistributedError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    mode = args.mode
    if mode == "auto":
        if args.coordinator or env.get(ENV_COORDINATOR):
            mode = "explicit"
        elif on_slurm(env) and int(env.get("SLURM_NTASKS", "1")) > 1:
            mode = "slurm"
        elif on_tpu_vm(env, tpu_device_files):
            mode = "tpu"
        else:
            mode = "single"
    if mode == "explicit":
        return _explicit_plan(args, env)
    if mode == "slurm":
        return _slurm_plan(args, env)
    if mode in ("tpu", "jax"):
        return Plan(mode)
    return Plan("single")


# ----------------------------------------------------------------------------- initialization

_initialized: Plan | None = None


def initialize_from_env(
    args: DistributedArgs | None = None, env: Mapping[str, str] | None = None
) -> Plan:
    """Join the multi-process run this process belongs to (a no-op for a single process or a
    second call). Must run before any JAX computation or device query."""
    global _initialized
    if _initialized is not None:
        return _initialized
    import jax

    plan = resolve(args, env)
    timeout = (args or DistributedArgs()).timeout_s
    if plan.kind in ("tpu", "jax"):  # JAX detects the cluster and its topology itself
        jax.distributed.initialize(initialization_timeout=timeout)
    elif plan.kind != "single":
        # Cross-process collectives on CPU (tests, CPU clusters) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=plan.coordinator,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
            # Our plan is complete: keep JAX from re-detecting SLURM and overriding devices.
            cluster_detection_method="deactivate",
            initialization_timeout=timeout,
        )
    _initialized = plan
    return plan


def is_main_process() -> bool:
    """True on process 0: the one that logs, draws progress bars and writes run files."""
    import jax

    return jax.process_index() == 0


# ----------------------------------------------------------------------------- data shares


@dataclasses.dataclass(frozen=True)
class BatchShare:
    """This process's rows of a global batch: rows [start, start + rows) = share `index` of
    `count` equal shares. Feed the data loader (index, count) so each process reads only its
    own examples."""

    index: int
    count: int
    start: int
    rows: int


def batch_share(mesh: Any, global_batch: int, process_index: int | None = None) -> BatchShare:
    """Which rows of a `[global_batch, ...]` array sharded by `sharding.batch_spec` live on
    this process's devices. Processes that hold the same rows (a mesh split across processes
    only on non-batch axes) get the same share and must feed the same data."""
    import jax
    from jax.sharding import NamedSharding

    from cmat_jax.sharding import batch_spec

    pid = jax.process_index() if process_index is None else process_index
    sharding = NamedSharding(mesh, batch_spec(1))
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        sl = index[0]
        span = range(*sl.indices(global_batch))
        rows.setdefault(device.process_index, set()).update(span)
    mine = sorted(rows.get(pid, ()))
    if not mine:
        raise DistributedError(f"process {pid} holds no devices of the mesh")
    start, n = mine[0], len(mine)
    if mine != list(range(start, start + n)) or global_batch % n or start % n:
        raise DistributedError(
            f"mesh {dict(mesh.shape)}: process {pid}'s batch rows are not one aligned block "
            f"(order the mesh devices by process)"
        )
    return BatchShare(index=start // n, count=global_batch // n, start=start, rows=n)


def batch_ways(mesh: Any) -> int:
    """Number of batch shards of the mesh (the product of the axes the batch is split over)."""
    from cmat_jax.sharding import batch_spec

    axes = batch_spec(1)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = 1
    for a in axes:
        ways *= int(mesh.shape[a])
    return ways


def share_count(mesh: Any) -> int:
    """How many distinct row blocks the processes hold (= global rows / rows per process)."""
    return batch_share(mesh, batch_ways(mesh)).count


def global_batch(local: Mapping[str, Any], mesh: Any) -> dict[str, Any]:
    """Global batch `jax.Array`s from this process's rows (`batch_share`) of every field.

    Each field `[rows, ...]` becomes `[rows * share_count(mesh), ...]`, sharded by
    `sharding.batch_spec`; with one process this is a plain `device_put`."""
    import jax
    from jax.sharding import NamedSharding

    from cmat_jax.sharding import batch_spec

    count = share_count(mesh)
    out: dict[str, Any] = {}
    for name, value in local.items():
        x = np.asarray(value)
        if x.ndim == 0:
            raise DistributedError(f"batch field {name!r} is a scalar; expected [rows, ...]")
        shape = (x.shape[0] * count, *x.shape[1:])
        sharding = NamedSharding(mesh, batch_spec(x.ndim))
        out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


# ----------------------------------------------------------------------------- launcher

_ENTRY_POINTS = {"train": "cmat_jax.train", "evaluate": "cmat_jax.evaluate"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cmat_jax.distributed",
        description="Join a multi-process JAX run, then run an entry point "
        f"({', '.join(_ENTRY_POINTS)}) with the remaining arguments.",
    )
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--coordinator", help="host:port of process 0")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--local-device-ids", help="comma-separated local accelerator ids")
    p.add_argument("--port", type=int, help="coordinator port under SLURM")
    p.add_argument("--timeout-s", type=int, default=300)
    p.add_argument("entry", choices=sorted(_ENTRY_POINTS))
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> Any:
    import importlib

    ns = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    local = None
    if ns.local_device_ids:
        local = tuple(int(s) for s in ns.local_device_ids.split(","))
    args = DistributedArgs(
        mode=ns.mode,
        coordinator=ns.coordinator,
        num_processes=ns.num_processes,
        process_id=ns.process_id,
        local_device_ids=local,
        port=ns.port,
        timeout_s=ns.timeout_s,
    )
    plan = initialize_from_env(args)
    import jax

    if is_main_process():
        print(
            f"distributed: {plan.kind}, {jax.process_count()} process(es), "
            f"{jax.device_count()} devices ({jax.local_device_count()} local)",
            file=sys.stderr,
        )
    module = importlib.import_module(_ENTRY_POINTS[ns.entry])
    return module.main(list(ns.args))


if __name__ == "__main__":
    from cmat_jax.cli import run_cli

    run_cli(main)
