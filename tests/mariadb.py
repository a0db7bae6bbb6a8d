"""A private MariaDB server for tests marked ``mysql``.

``mariadb_params`` (session fixture) installs MariaDB from Debian if no server binary is found
(``apt-get install -y mariadb-server``; we run as root in CI), initialises a data directory in a
temp dir, starts ``mariadbd`` on a unix socket there with networking off, FILE operations
confined to that dir and symbolic links off, yields admin connection parameters, and stops the
server at the end of the session. The server is a module-level singleton so that importing the
fixture into several test modules still starts one server.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pymysql
import pytest

from cmat_jax.envs.mysql_backend import MySQLParams

_SERVER: dict[str, object] = {}


def _find_binary(*names: str) -> str | None:
    for name in names:
        for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if cand and os.access(cand, os.X_OK):
                return cand
    return None


def _ensure_installed() -> tuple[str, str]:
    server = _find_binary("mariadbd", "mysqld")
    if server is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "mariadb-server"],
            check=True,
            env=env,
            capture_output=True,
        )
        server = _find_binary("mariadbd", "mysqld")
    installer = _find_binary("mariadb-install-db", "mysql_install_db")
    if server is None or installer is None:
        raise RuntimeError("mariadb-server installed but mariadbd / mariadb-install-db not found")
    return server, installer


def _stop() -> None:
    proc = _SERVER.pop("proc", None)
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    root = _SERVER.pop("root", None)
    if isinstance(root, str):
        shutil.rmtree(root, ignore_errors=True)


def start_server() -> MySQLParams:
    """Start (once per process) and return admin parameters of the private server."""
    if "params" in _SERVER:
        return _SERVER["params"]  # type: ignore[return-value]
    server, installer = _ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="cmat_mariadb_"))
    data, files, sock = root / "data", root / "files", root / "mysqld.sock"
    files.mkdir()
    _SERVER["root"] = str(root)
    subprocess.run(
        [
            installer,
            "--no-defaults",
            f"--datadir={data}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--user=root",
        ],
        check=True,
        capture_output=True,
    )
    log = open(root / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            server,
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={sock}",
            "--skip-networking",
            "--user=root",
            f"--pid-file={root / 'mysqld.pid'}",
            f"--secure-file-priv={files}",
            "--local-infile=0",
            "--skip-symbolic-links",
            "--innodb-buffer-pool-size=32M",
            "--skip-log-bin",
            # a throw-away test server: no durability, so episode setup stays fast
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--innodb-flush-method=nosync",
            "--sync-frm=0",
            "--innodb-file-per-table=0",
            "--skip-name-resolve",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _SERVER["proc"] = proc
    atexit.register(_stop)
    params = MySQLParams(unix_socket=str(sock))
    deadline = time.monotonic() + 60
    while True:
        try:
            pymysql.connect(unix_socket=str(sock), user="root", password="").close()
            break
        except pymysql.MySQLError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop()
                raise RuntimeError(f"mariadbd did not start; see {root / 'server.log'}") from None
            time.sleep(0.2)
    _SERVER["params"] = params
    return params


@pytest.fixture(scope="session")
def mariadb_params():
    params = start_server()
    yield params
    _stop()
    _SERVER.pop("params", None)
