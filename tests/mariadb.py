"""A private MariaDB server for tests marked ``mysql``.

``mariadb_params`` (session fixture) installs MariaDB from Debian if no server binary is found
(``apt-get install -y mariadb-server``; we run as root in CI), initialises a data directory in a
private (0700) temp dir, starts ``mariadbd`` there listening only on a unix socket (networking
off; bound to loopback should it be turned on), FILE operations confined to that dir, symbolic
links and LOCAL INFILE off, values capped at ``RECOMMENDED_MAX_ALLOWED_PACKET`` and the InnoDB
tablespaces and temporary files capped (:data:`TABLESPACE_CAP`). It creates the least-privileged administrator the backend needs
(``cmat_admin``, :data:`ADMIN_GRANTS`, random password) and yields parameters that read its
credentials from an option file (mode 0600), never from argv; it stops the server at the end
of the session. The server is a module-level singleton so that importing the fixture into
several test modules still starts one server.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pymysql
import pytest

from cmat_jax.envs.mysql_backend import (
    ADMIN_GRANTS,
    DEFAULT_ADMIN,
    RECOMMENDED_MAX_ALLOWED_PACKET,
    MySQLParams,
)

# Every episode database lives in the system tablespace (file-per-table off): this caps them
# all together; a statement that would grow past it fails with 1114 "table is full".
TABLESPACE_CAP = "ibdata1:12M:autoextend:max:512M"
TEMP_TABLESPACE_CAP = "ibtmp1:12M:autoextend:max:256M"

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
    root = Path(tempfile.mkdtemp(prefix="cmat_mariadb_"))  # mode 0700: only we reach the socket
    data, files, sock, tmp = root / "data", root / "files", root / "mysqld.sock", root / "tmp"
    files.mkdir()
    tmp.mkdir()
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
            "--bind-address=127.0.0.1",
            "--user=root",
            f"--tmpdir={tmp}",
            f"--pid-file={root / 'mysqld.pid'}",
            f"--secure-file-priv={files}",
            "--local-infile=0",
            f"--max-allowed-packet={RECOMMENDED_MAX_ALLOWED_PACKET}",
            "--skip-symbolic-links",
            "--innodb-buffer-pool-size=32M",
            "--skip-log-bin",
            # a throw-away test server: no durability, so episode setup stays fast
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--innodb-flush-method=nosync",
            "--sync-frm=0",
            "--innodb-file-per-table=0",
            f"--innodb-data-file-path={TABLESPACE_CAP}",
            f"--innodb-temp-data-file-path={TEMP_TABLESPACE_CAP}",
            "--skip-name-resolve",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _SERVER["proc"] = proc
    atexit.register(_stop)
    deadline = time.monotonic() + 60
    while True:
        try:
            root_conn = pymysql.connect(unix_socket=str(sock), user="root", password="")
            break
        except pymysql.MySQLError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop()
                raise RuntimeError(f"mariadbd did not start; see {root / 'server.log'}") from None
            time.sleep(0.2)
    _SERVER["params"] = params = _create_admin(root_conn, root, sock)
    root_conn.close()
    return params


def _create_admin(root_conn: pymysql.connections.Connection, root: Path, sock: Path) -> MySQLParams:
    """The backend's administrator with only :data:`ADMIN_GRANTS`; its credentials go to an
    option file only the owner can read."""
    password = secrets.token_hex(16)
    account = f"'{DEFAULT_ADMIN}'@'localhost'"
    with root_conn.cursor() as cur:
        cur.execute(f"CREATE USER {account} IDENTIFIED BY %s", (password,))
        for grant in ADMIN_GRANTS:
            cur.execute(grant.format(user=account))
    option_file = root / "admin.cnf"
    fd = os.open(option_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[client]\nuser={DEFAULT_ADMIN}\npassword={password}\nsocket={sock}\n")
    return MySQLParams(option_file=str(option_file))


def server_pid() -> int | None:
    """Process id of the running test server (to measure its memory), None before it starts."""
    proc = _SERVER.get("proc")
    return proc.pid if isinstance(proc, subprocess.Popen) else None


@pytest.fixture(scope="session")
def mariadb_params():
    params = start_server()
    yield params
    _stop()
    _SERVER.pop("params", None)
