"""Hostile commands in the OS-task sandbox: each is stopped by the sandbox, the host is left
unchanged (checked from the host), and the next episode starts clean."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from cmat_jax.cli import HostSetupError
from cmat_jax.envs.os_sandbox import Limits, Sandbox, SandboxUnavailable, rootfs_path
from tests.os_fixtures import os_image  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("os_image")
REPO = Path(__file__).resolve().parents[1]


def _process_table() -> dict[int, tuple[int, str]]:
    """Host PID -> (parent PID, state) of every live process."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(d.name)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int) -> set[int]:
    """Live (non-zombie) host processes below ``root``: a sandbox's are below its bwrap."""
    table = _process_table()
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, (pp, st) in table.items() if pp in frontier and st != "Z"} - found
        found |= frontier
    return found


def wait_gone(pids: set[int], timeout: float = 5.0) -> set[int]:
    """The processes of ``pids`` still alive (not zombies) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        table = _process_table()
        left = {p for p in pids if p in table and table[p][1] != "Z"}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def sandbox_root(sb: Sandbox) -> int:
    assert sb._proc is not None
    return sb._proc.pid


def image_fingerprint() -> tuple[int, int, float]:
    """(entries, bytes, newest mtime) of the cached root filesystem."""
    n = size = 0
    newest = 0.0
    for dirpath, dirnames, filenames in os.walk(rootfs_path("default")):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime)
    return n, size, newest


def assert_fresh(sb: Sandbox) -> None:
    """What a clean episode sees: the image's files, only its own processes, working tools."""
    count_procs = "import os; print(sum(p.isdigit() for p in os.listdir('/proc')))"
    out = sb.shell(f'ls -A /root /tmp | wc -l; python3 -c "{count_procs}"; id -un; ls /home')
    # ls: "/root:", .bashrc, .profile, blank, "/tmp:"; processes: PID 1, bash and python3
    assert out.split() == ["5", "3", "root", "ubuntu"], out


def test_fork_bomb_is_contained_and_the_next_episode_is_clean():
    limits = Limits(processes=128)
    with Sandbox(limits=limits) as sb:
        sb.shell(":(){ :|:& };:", timeout=3)
        time.sleep(1)
        procs = descendants(sandbox_root(sb))
        assert len(procs) <= limits.processes + 1  # + PID 1, below bwrap
        out = sb.shell("echo still-answering", timeout=5)
        assert "still-answering" in out or "fork" in out
    assert wait_gone(procs) == set()
    with Sandbox() as sb:
        assert_fresh(sb)


def test_rm_rf_root_leaves_the_image_and_the_host_alone(tmp_path):
    before = image_fingerprint()
    with Sandbox() as sb:
        sb.shell("rm -rf --no-preserve-root / 2>/dev/null", timeout=30)
        left = sb.shell(
            "shopt -s dotglob nullglob; a=(/*); b=(/usr/bin/*); echo ${#a[@]} ${#b[@]} ${a[@]}"
        )
        assert left.split() == ["2", "0", "/dev", "/proc"]  # mount points cannot be removed
        code, _ = sb.run(["/usr/bin/python3", "-c", "print(1)"])
        assert code != 0
    assert image_fingerprint() == before
    assert (REPO / "pyproject.toml").is_file()
    with Sandbox() as sb:
        assert_fresh(sb)


def test_filling_the_disk_stops_at_the_limits():
    limits = Limits(disk_mb=128, file_mb=64)
    with Sandbox(limits=limits) as sb:
        out = sb.shell(
            "dd if=/dev/zero of=/root/one bs=1M count=100 2>&1; ls -s --block-size=1M /root/one"
        )
        assert "File size limit exceeded" in out or "File too large" in out
        assert out.strip().endswith("64 /root/one")
        out = sb.shell(
            "for i in 1 2 3; do dd if=/dev/zero of=/var/f$i bs=1M count=60 2>&1 | grep -o 'No space.*'; done;"
            " df -m / | tail -1 | awk '{print $3}'",
            timeout=30,
        )
        assert "No space left on device" in out
        assert int(out.split()[-1]) <= 128
        out = sb.shell("for i in 1 2; do dd if=/dev/zero of=/dev/shm/$i bs=1M count=40 2>&1; done")
        assert "No space left on device" in out
        assert sb.shell("echo after") == "after\n"


def test_host_files_and_environment_are_unreachable(tmp_path, monkeypatch):
    secret, tag = f"cmat-secret-{uuid.uuid4().hex}", uuid.uuid4().hex
    monkeypatch.setenv("CMAT_CANARY", secret)
    canary = tmp_path / f"canary-{tag}"
    canary.write_text(secret)
    home_canary = Path.home() / f".cmat-canary-{tag}"
    home_canary.write_text(secret)
    try:
        with Sandbox() as sb:
            out = sb.shell(
                f"cat /proc/1/environ /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {secret};"
                f" cat {canary} {home_canary} 2>&1; ls {REPO} {REPO}/pyproject.toml 2>&1;"
                f" find / -xdev -name '*{tag}*' 2>/dev/null | wc -l; ls /root | wc -l; hostname",
                timeout=30,
            )
            code, script_out = sb.run(["bash", "-c", f"env; cat {home_canary}"])
    finally:
        home_canary.unlink()
    lines = out.splitlines()
    assert lines[0] == "0"  # no process in the sandbox carries the host's environment
    assert all("No such file or directory" in line for line in lines[1:5]), out
    assert lines[5:] == ["0", "0", "sandbox"] and secret not in out
    assert code != 0 and secret not in script_out and "CMAT_CANARY" not in script_out


def test_no_network():
    name = f"\0cmat-canary-{uuid.uuid4().hex}"
    host_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_sock.bind(name)  # an abstract socket on the host: reachable from the host's netns only
    host_sock.listen(1)
    try:
        with Sandbox() as sb:
            probe = textwrap.dedent(f"""
                import socket
                for family, addr in ((socket.AF_INET, ("1.1.1.1", 53)), (socket.AF_INET6, ("2606:4700::1111", 53)),
                                     (socket.AF_UNIX, {name!r})):
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.settimeout(2)
                    try:
                        s.connect(addr)
                        print("CONNECTED", addr)
                    except OSError as e:
                        print("refused", e.errno)
                """)
            out = sb.shell(f"python3 -c {_quote(probe)}; curl -sS -m 3 http://deb.debian.org 2>&1 | head -1;"
                           " tail -n +3 /proc/net/dev | cut -d: -f1", timeout=20)  # fmt: skip
    finally:
        host_sock.close()
    assert "CONNECTED" not in out and out.count("refused") == 3
    assert "Could not resolve host" in out
    assert out.split()[-1] == "lo" and out.count("\n") == 5  # the only interface: loopback


def test_proc_and_mount_tricks_do_not_escape():
    with Sandbox() as sb:
        out = sb.shell(
            "mount -t proc proc /mnt 2>&1 | head -1; umount /proc 2>&1 | head -1;"
            " echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger; ls /sys | wc -l;"
            " ls /dev | tr '\\n' ' '; echo; ls /proc/1/root/ | grep -c work;"
            " unshare -Urm sh -c 'mount -t tmpfs x /mnt && touch /mnt/nested' 2>&1; ls /mnt | wc -l",
            timeout=20,
        )
        lines = out.splitlines()
        assert "permission denied" in lines[0] and "must be superuser" in lines[1]
        assert (
            "sysrq" in out and out.count("Read-only file system") + out.count("No such file") >= 2
        )
        devs = set(lines[-3].split())
        assert devs <= {"console", "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random",
                        "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"}  # fmt: skip
        assert lines[-2] == "0" and lines[-1] == "0" and lines[-4] == "0"
        escape = textwrap.dedent("""
            import os
            os.makedirs("/jail/deeper", exist_ok=True)
            os.chroot("/jail")
            for _ in range(20):
                os.chdir("..")
            os.chroot(".")
            print(sorted(os.listdir("/")))
            """)
        out = sb.shell(f"python3 -c {_quote(escape)}")
        assert "'jail'" in out and "'work'" not in out  # still the sandbox's own root
        out = sb.shell("kill -9 1; kill -9 -1; sleep 0.2; echo survived")
        assert out.endswith("survived\n")
    assert not Path("/jail").exists() and not Path("/mnt/nested").exists()


def test_cpu_and_memory_limits():
    with Sandbox(limits=Limits(cpu_s=1, address_space_mb=512)) as sb:
        t0 = time.monotonic()
        out = sb.shell("python3 -c 'while True: pass'; echo status=$?", timeout=20)
        assert time.monotonic() - t0 < 10 and ("status=137" in out or "status=152" in out), out
        out = sb.shell("python3 -c 'x = bytearray(1 << 30)' 2>&1 | tail -1")
        assert out.strip() == "MemoryError"
    with Sandbox(limits=Limits(memory_mb=128)) as sb:
        out = sb.shell("python3 -c 'x = bytearray(600 << 20); x[::4096] = b\"1\" * len(x[::4096]); print(\"kept\")'; echo status=$?", timeout=30)  # fmt: skip
        if sb.cgroup_limits:  # the cgroup caps the whole sandbox's memory
            assert "kept" not in out and "status=137" in out, out
        else:  # without cgroups only the per-process address-space rlimit applies
            assert "kept" in out


def test_background_processes_die_with_the_episode():
    with Sandbox() as sb:
        sb.shell(
            "nohup sleep 1001 >/dev/null 2>&1 & setsid sleep 1002 & (setsid sleep 1003 &); disown -a"
        )
        sb.run(["bash", "-c", "setsid sleep 1004 >/dev/null 2>&1 < /dev/null &"])
        assert sb.shell("sleep 0.5; ps -e -o cmd= | grep -c '^sleep 100'").strip() == "4"
        procs = descendants(sandbox_root(sb))
        assert len(procs) >= 6  # PID 1, bash, 4 sleeps
    assert wait_gone(procs) == set()


def test_everything_dies_when_the_host_process_is_killed():
    code = (
        "from cmat_jax.envs.os_sandbox import Sandbox; import sys, time\n"
        "sb = Sandbox(); sb.shell('setsid sleep 1005 & nohup sleep 1006 &'); time.sleep(0.3)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        procs = descendants(proc.pid) - {proc.pid}
        assert len(procs) >= 5  # stage1-turned-bwrap, PID 1, bash, 2 sleeps
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert wait_gone(procs) == set()


def test_without_user_namespaces_it_refuses_clearly():
    """A host that forbids user namespaces (here: a bwrap with --disable-userns around Python)
    gets SandboxUnavailable naming the cause; nothing runs unsandboxed."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    code = (
        "from cmat_jax.envs.os_sandbox import Sandbox, SandboxUnavailable\n"
        "try:\n    Sandbox()\nexcept SandboxUnavailable as e:\n    print('REFUSED', e)\n"
        "else:\n    print('STARTED')\n"
    )
    done = subprocess.run(
        [
            bwrap,
            "--dev-bind",
            "/",
            "/",
            "--unshare-user",
            "--disable-userns",
            "--uid",
            "0",
            "--gid",
            "0",
            "--",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.startswith(
        "REFUSED cannot isolate the OS task: creating a user namespace"
    ), done.stdout + done.stderr
    assert "never runs unsandboxed" in done.stdout
    # a host-setup error: the CLIs print it as one line and exit 2
    assert issubclass(SandboxUnavailable, HostSetupError) and issubclass(
        SandboxUnavailable, RuntimeError
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
