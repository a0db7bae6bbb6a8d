"""Fault injection for crash tests (a testing hook; inert unless the variable is set).

`CMAT_JAX_FAULT=POINT:N` makes the process SIGKILL itself the N-th time it reaches fault point
POINT (`POINT:N:stop`: SIGSTOP, for a test that changes the world before it goes on), so a
test can kill a real `python -m cmat_jax.train cmat ...` inside a chosen stage and check that `--resume` ends exactly where an uninterrupted run does.

A point's full name is its scopes and its own name joined by "/": the CMAT job names its
stages (`agent_tuning`, `round<R>`, `eval_<stage>`), the steps inside them (`update_step`,
`rollout_step`, `episodes_written`) and the checkpointer each save it starts (`checkpoint_save`, after the previous one is done).
POINT matches a full name or any "/"-separated suffix of it, e.g. `round2/rollout_step:3`
(the third lockstep step of round 2's rollouts), `update_step:1` (the first optimizer step
anywhere), `eval_cmat/episodes_written:1` (the final evaluation's first split written).
`python -m cmat_jax.evaluate` reaches `eval_journal_append` before it journals each finished
chunk of episodes (`eval_journal_append:3`: killed with two chunks journaled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

FAULT_ENV = "CMAT_JAX_FAULT"

_scopes: list[str] = []
_hits: dict[str, int] = {}


def _target() -> tuple[str, int, signal.Signals] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}.get(
        parts[2] if len(parts) == 3 else "kill"
    )
    if (
        len(parts) not in (2, 3)
        or not parts[0]
        or not parts[1].isdigit()
        or int(parts[1]) < 1
        or sig is None
    ):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected POINT:N[:kill|stop] with N >= 1")
    return parts[0], int(parts[1]), sig


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Fault points reached inside are named `name/...`."""
    _scopes.append(name)
    try:
        yield
    finally:
        _scopes.pop()


def fault_point(name: str) -> None:
    """Signal this process if `CMAT_JAX_FAULT` names this point and its count is reached."""
    target = _target()
    if target is None:
        return
    point, count, sig = target
    full = "/".join([*_scopes, name])
    if full != point and not full.endswith("/" + point):
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == count:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), sig)
