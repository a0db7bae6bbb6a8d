"""Isolated Linux sandboxes for the AgentBench OS task.

The userland is Debian (``bookworm``) built from Debian's package registry by ``mmdebstrap``
into a cached root filesystem (``~/.cache/cmat_jax/os_sandbox/<image>``) with the tools of
AgentBench's images: python3, pip, git, vim, curl, wget, unzip, zip, tree (+ procps); the
``packages`` image adds npm and is built only when a task asks for it. Set up once with::

    python -m cmat_jax.sandbox setup            # the default image (0.5-2.5 min)
    python -m cmat_jax.sandbox setup --image packages

Each :class:`Sandbox` (one per episode) is:

- its own user namespace: root inside is an unprivileged host id (the one the cached root
  filesystem belongs to), 65,536 ids mapped, so ``useradd`` / ``chown`` / ``su`` work inside
  and nothing inside has any privilege outside (as root the mapping is written directly; a
  normal user needs a subordinate id range in /etc/subuid and /etc/subgid and ``newuidmap``);
- its own mount namespace whose root is an overlay: the cached root filesystem, read-only, under
  a private size-limited tmpfs that takes every write and disappears with the sandbox; nothing
  of the host is mounted (no home, no repository, no host /tmp);
- its own PID, network (loopback only: no network), IPC, UTS and cgroup namespaces (bubblewrap);
- resource limits: per-process rlimits (CPU seconds, address space, file size, open files,
  processes per sandbox user) and, when the host lets this process manage cgroups, a memory
  and a process-count cgroup for the whole sandbox; the tmpfs size bounds its disk;
- Docker's default capability set inside minus NET_RAW and MKNOD (so no SYS_ADMIN: no mounts;
  no SYS_PTRACE, SYS_MODULE, SYS_TIME, ...), all of them powers over this user namespace only;
- torn down at :meth:`Sandbox.close`: the supervisor (PID 1) is killed, so the kernel kills every
  process left in the sandbox, and the tmpfs with them.

Without user namespaces (``user.max_user_namespaces`` = 0, Debian's
``kernel.unprivileged_userns_clone`` = 0, Ubuntu's AppArmor restriction, a container that
forbids ``unshare``) no sandbox can be built: :class:`SandboxUnavailable` says so and why;
nothing ever runs unsandboxed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cmat_jax.cli import HostSetupError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-pip", "git", "vim", "curl", "wget", "unzip", "zip", "tree",
                 "procps")  # fmt: skip
IMAGES: dict[str, tuple[str, ...]] = {
    "default": BASE_PACKAGES,
    "packages": (*BASE_PACKAGES, "npm"),
}
# `FROM ubuntu` (24.04) ships a user "ubuntu" (uid 1000) with a home: so does this image.
CUSTOMIZE = ('chroot "$1" useradd --create-home --shell /bin/bash ubuntu',)
RECIPE = 1  # bump when the image recipe changes: cached images of another recipe are rebuilt
HOST_TOOLS = {"mmdebstrap": "mmdebstrap", "bwrap": "bubblewrap"}
ID_COUNT = 65536
ROOT_ID_BASE = 1_000_000  # host id of root inside, for a root host without an /etc/subuid range
HOSTNAME = "sandbox"
# Docker's default capabilities, minus NET_RAW and MKNOD (nothing to gain without network/devs).
CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                "SETPCAP", "SETFCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "AUDIT_WRITE")  # fmt: skip
_HERE = Path(__file__).resolve().parent


class SandboxUnavailable(HostSetupError):
    """The host cannot build or start an isolated sandbox; the message says why and what to do."""


class SandboxError(RuntimeError):
    """A running sandbox stopped answering (it is closed when this is raised)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox."""

    disk_mb: int = 512
    """Size of the private writable layer (tmpfs)."""
    inodes: int = 65536
    memory_mb: int = 1024
    """Memory of the whole sandbox (cgroup, when available)."""
    address_space_mb: int = 4096
    """Virtual memory of each process (rlimit)."""
    processes: int = 256
    """Processes of the sandbox's user (rlimit; plus a cgroup cap when available)."""
    cpu_s: int = 120
    """CPU seconds of each process (rlimit)."""
    file_mb: int = 256
    open_files: int = 1024
    command_timeout_s: float = 10.0
    """Wall time of one command in the agent's shell before Ctrl-C."""
    script_timeout_s: float = 60.0
    """Wall time of one init / check script."""


# -- where things live -----------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(
        os.environ.get("CMAT_OS_SANDBOX_CACHE", "~/.cache/cmat_jax/os_sandbox")
    ).expanduser()


def rootfs_path(image: str) -> Path:
    if image not in IMAGES:
        raise ValueError(f"unknown OS image {image!r} (known: {', '.join(IMAGES)})")
    return cache_dir() / image


def _meta_path(image: str) -> Path:
    return rootfs_path(image).with_name(image + ".json")


def _id_range() -> tuple[int, int, str]:
    """(host uid and host gid of root inside, how the maps are written)."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    starts = []
    for path in ("/etc/subuid", "/etc/subgid"):
        for line in _read_lines(path):
            name, _, rest = line.partition(":")
            start, _, count = rest.partition(":")
            if name in (user, str(os.getuid())) and count.isdigit() and int(count) >= ID_COUNT:
                starts.append(int(start))
                break
    if len(starts) == 2:
        return starts[0], starts[1], "direct" if os.geteuid() == 0 else "newuidmap"
    if os.geteuid() == 0:
        return ROOT_ID_BASE, ROOT_ID_BASE, "direct"
    raise SandboxUnavailable(
        f"user {user} has no subordinate id range of {ID_COUNT} ids in /etc/subuid and "
        "/etc/subgid (the OS sandbox maps 65,536 ids: useradd / chown inside need them). Ask an "
        f"administrator for one (usermod --add-subuids 100000-165535 --add-subgids "
        f"100000-165535 {user}) and install newuidmap (Debian/Ubuntu package 'uidmap')."
    )


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


# -- building the root filesystem --------------------------------------------------------------


def _host_tools() -> dict[str, str]:
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", *missing, "uidmap"],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SandboxUnavailable(f"apt-get install {' '.join(missing)} failed:\n{done.stderr}")
    found = {tool: shutil.which(tool) for tool in HOST_TOOLS}
    absent = [HOST_TOOLS[t] for t, p in found.items() if p is None]
    if absent:
        raise SandboxUnavailable(
            f"the OS sandbox needs {', '.join(absent)} (Debian/Ubuntu: sudo apt-get install "
            f"{' '.join(absent)} uidmap)"
        )
    return {t: str(p) for t, p in found.items()}


def build_rootfs(image: str = "default", *, log: Any = None) -> dict[str, Any]:
    """Build the cached root filesystem of ``image`` (replacing an existing one); returns its
    metadata (packages, id base, build seconds)."""
    path = rootfs_path(image)
    tools = _host_tools()
    uid_base, gid_base, how = _id_range()
    tmp = path.with_name(path.name + ".building")
    _remove_tree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mode = "root" if os.geteuid() == 0 else "unshare"
    cmd = [
        tools["mmdebstrap"],
        f"--mode={mode}",
        "--variant=minbase",
        "--include=" + ",".join(IMAGES[image]),
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        *(f"--customize-hook={hook}" for hook in CUSTOMIZE),
        os.environ.get("CMAT_OS_SUITE", SUITE),
        str(tmp),
        os.environ.get("CMAT_OS_MIRROR", MIRROR),
    ]
    if log:
        log(f"building the {image} image: {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        _remove_tree(tmp)
        raise SandboxUnavailable(
            f"mmdebstrap failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    if mode == "root":
        _shift_ownership(tmp, uid_base, gid_base)  # root inside = these host ids
    meta = {
        "image": image,
        "recipe": RECIPE,
        "packages": list(IMAGES[image]),
        "suite": os.environ.get("CMAT_OS_SUITE", SUITE),
        "id_base": [uid_base, gid_base],
        "id_mapping": how,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    _meta_path(image).unlink(missing_ok=True)
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _meta_path(image).write_text(json.dumps(meta) + "\n")  # written last: marks it complete
    _remove_tree(old)
    if log:
        log(f"built {path} in {meta['build_s']} s")
    return meta


def _shift_ownership(root: Path, uid_base: int, gid_base: int) -> None:
    """Add the bases to the owner and group of every file (a chown clears set-id bits: restore
    the mode)."""
    for dirpath, dirnames, filenames in os.walk(root):
        entries = [dirpath, *(os.path.join(dirpath, n) for n in filenames)]
        entries += [
            os.path.join(dirpath, n) for n in dirnames if os.path.islink(os.path.join(dirpath, n))
        ]
        for p in entries:
            st = os.lstat(p)
            os.lchown(p, st.st_uid + uid_base, st.st_gid + gid_base)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode))


def _remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def rootfs_meta(image: str) -> dict[str, Any] | None:
    """The metadata of the cached image (None when missing or built by another recipe)."""
    try:
        meta = json.loads(_meta_path(image).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("recipe") == RECIPE else None


def ensure_rootfs(image: str = "default", *, log: Any = None) -> Path:
    """The cached root filesystem of ``image``, built first when missing (under a lock, so
    concurrent callers build it once)."""
    path = rootfs_path(image)
    if rootfs_meta(image) is not None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{image}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rootfs_meta(image) is None:
            build_rootfs(image, log=log)
    return path


# -- cgroups -----------------------------------------------------------------------------------


class _Cgroups:
    """A memory + pids cgroup for one sandbox (cgroup v2, or v1 memory and pids hierarchies)."""

    def __init__(self, limits: Limits) -> None:
        self.dirs: list[Path] = []
        name = f"cmat_os_{uuid.uuid4().hex[:12]}"
        mem = str(limits.memory_mb << 20)
        pids = str(limits.processes)
        top = Path("/sys/fs/cgroup")
        plan: list[tuple[Path, dict[str, str]]] = []
        if (top / "cgroup.subtree_control").exists():  # cgroup v2
            ctl = set((top / "cgroup.subtree_control").read_text().split())
            if {"memory", "pids"} <= ctl:
                plan = [(top / name, {"memory.max": mem, "memory.swap.max": "0", "pids.max": pids})]
        elif (top / "memory").is_dir() and (top / "pids").is_dir():  # cgroup v1
            plan = [
                (top / "memory" / name, {"memory.limit_in_bytes": mem}),
                (top / "pids" / name, {"pids.max": pids}),
            ]
        try:
            for d, files in plan:
                d.mkdir()
                self.dirs.append(d)
                for f, v in files.items():
                    with contextlib.suppress(FileNotFoundError):
                        (d / f).write_text(v)
        except OSError:
            self.remove()
            self.dirs = []

    @property
    def active(self) -> bool:
        return bool(self.dirs)

    def add(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
        self.dirs = []


# -- the sandbox -------------------------------------------------------------------------------


def _userns_error(stage1_error: str) -> SandboxUnavailable:
    hints = []
    if Path("/proc/sys/user/max_user_namespaces").exists():
        v = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
        if v == "0":
            hints.append("user.max_user_namespaces is 0 (sysctl -w user.max_user_namespaces=15000)")
    for f, bad in (("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                   ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):  # fmt: skip
        with contextlib.suppress(OSError):
            if Path(f).read_text().strip() == bad:
                hints.append(f"{f} is {bad}")
    why = (
        "; ".join(hints)
        or "the kernel or a container runtime (seccomp) refuses unshare(CLONE_NEWUSER)"
    )
    return SandboxUnavailable(
        f"cannot isolate the OS task: {stage1_error}. The OS sandbox needs user namespaces "
        f"({why}). Nothing was run: the OS task never runs unsandboxed."
    )


class Sandbox:
    """One isolated Linux environment with a persistent interactive bash (see module doc).

    ``shell(cmd)`` runs in the persistent shell; ``run(argv)`` runs an independent process (init
    and check scripts); ``close()`` kills everything. Start-up takes tens of milliseconds."""

    def __init__(self, image: str = "default", limits: Limits | None = None) -> None:
        self.image = image
        self.limits = limits or Limits()
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups: _Cgroups | None = None
        self.cgroup_limits = False
        self._start()

    def _start(self) -> None:
        rootfs = rootfs_path(self.image)
        meta = rootfs_meta(self.image)
        if meta is None:
            raise SandboxUnavailable(
                f"no OS image {self.image!r} at {rootfs}: run `python -m cmat_jax.sandbox "
                f"setup --image {self.image}`"
            )
        uid_base, gid_base, how = _id_range()
        if meta["id_base"] != [uid_base, gid_base]:
            raise SandboxUnavailable(
                f"{rootfs} belongs to host ids {meta['id_base']}, this user maps root to "
                f"{[uid_base, gid_base]}: "
                f"rebuild it (python -m cmat_jax.sandbox setup --image {self.image})"
            )
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable("bwrap not found: run `python -m cmat_jax.sandbox setup`")
        lim = self.limits
        code_fd = os.memfd_create("cmat-os-supervisor", 0)  # inheritable: no MFD_CLOEXEC
        os.write(code_fd, (_HERE / "os_supervisor.py").read_bytes())
        cfg = {
            "rootfs": str(rootfs),
            "stage": "/tmp",
            "disk_bytes": lim.disk_mb << 20,
            "inodes": lim.inodes,
            "bwrap": bwrap,
            "rlimits": {
                "RLIMIT_CPU": lim.cpu_s,
                "RLIMIT_AS": lim.address_space_mb << 20,
                "RLIMIT_FSIZE": lim.file_mb << 20,
                "RLIMIT_NOFILE": lim.open_files,
                "RLIMIT_NPROC": lim.processes,
                "RLIMIT_CORE": 0,
            },
            "bwrap_args": self._bwrap_args(code_fd),
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_HERE / "os_stage1.py"), json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={},
                cwd="/",
                start_new_session=True,
                pass_fds=(code_fd,),
            )
        finally:
            os.close(code_fd)
        self._proc = proc
        try:
            first = self._read_line()
            if first != "mapped?":
                err = _error_of(first) or self._stderr()
                raise _userns_error(err)
            self._map_ids(proc.pid, uid_base, gid_base, how)
            self._cgroups = _Cgroups(lim) if os.geteuid() == 0 else None
            if self._cgroups is not None and self._cgroups.active:
                self._cgroups.add(proc.pid)
                self.cgroup_limits = True
            self._send_raw("go\n")
            ready = self._read_line()
            if ready is None or not ready.startswith('{"ready"'):
                err = _error_of(ready) or self._stderr() or "the sandbox did not start"
                if "Operation not permitted" in err:  # namespaces without their powers
                    raise _userns_error(err)
                raise SandboxUnavailable(f"cannot start the OS sandbox: {err}")
        except BaseException:
            self.close()
            raise

    def _bwrap_args(self, code_fd: int) -> list[str]:
        args = [
            "--proc", "/proc",
            # Host-root-only (unreadable here, unlike in Docker, where root is host root):
            # hidden so `find /` runs without errors, as the AgentBench checks expect.
            "--size", "4096", "--tmpfs", "/proc/tty/driver",
            "--dev", "/dev",
            "--size", str(64 << 20), "--tmpfs", "/dev/shm",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname", HOSTNAME,
            "--die-with-parent", "--new-session", "--as-pid-1",
            "--cap-drop", "ALL",
        ]  # fmt: skip
        for cap in CAPABILITIES:
            args += ["--cap-add", f"CAP_{cap}"]
        # The supervisor's code comes in on an inherited memory file: its command line stays
        # short in the sandbox's `ps` (it closes the descriptor once running).
        code = f"/dev/fd/{code_fd}"
        return [*args, "--chdir", "/", "--", "/usr/bin/python3", "-I", "-S", code, str(code_fd)]

    @staticmethod
    def _map_ids(pid: int, uid_base: int, gid_base: int, how: str) -> None:
        if how == "direct":
            Path(f"/proc/{pid}/uid_map").write_text(f"0 {uid_base} {ID_COUNT}\n")
            Path(f"/proc/{pid}/gid_map").write_text(f"0 {gid_base} {ID_COUNT}\n")
            return
        for tool, base in (("newuidmap", uid_base), ("newgidmap", gid_base)):
            exe = shutil.which(tool)
            if exe is None:
                raise SandboxUnavailable(f"{tool} not found (Debian/Ubuntu package 'uidmap')")
            done = subprocess.run(
                [exe, str(pid), "0", str(base), str(ID_COUNT)], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SandboxUnavailable(f"{tool} failed: {done.stderr.strip()}")

    # -- the wire -------------------------------------------------------------------------------
    def _send_raw(self, text: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def _read_line(self) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        return line.decode("utf-8", "replace").rstrip("\n") if line else None

    def _stderr(self) -> str:
        if self._proc is None or self._proc.stderr is None:
            return ""
        with contextlib.suppress(Exception):
            self._proc.kill()
            return self._proc.stderr.read().decode("utf-8", "replace").strip()[-2000:]
        return ""

    def _request(self, req: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None:
            raise SandboxError("the sandbox is closed")
        try:
            self._send_raw(json.dumps(req) + "\n")
            line = self._read_line()
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            err = self._stderr()
            self.close()
            raise SandboxError(f"the OS sandbox stopped answering{': ' + err if err else ''}")
        return json.loads(line)

    # -- the API --------------------------------------------------------------------------------
    def shell(self, cmd: str, timeout: float | None = None) -> str:
        """Run ``cmd`` in the persistent interactive shell; its output (stdout and stderr as a
        terminal shows them). Past the time limit the command is interrupted."""
        t = self.limits.command_timeout_s if timeout is None else timeout
        return self._request({"op": "shell", "cmd": cmd, "timeout": t})["output"]

    def run(self, argv: list[str], timeout: float | None = None) -> tuple[int, str]:
        """Run ``argv`` as an independent process; (exit code, stdout + stderr)."""
        t = self.limits.script_timeout_s if timeout is None else timeout
        rep = self._request({"op": "run", "argv": list(argv), "timeout": t})
        return int(rep["code"]), rep["output"]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)  # stage1 became bwrap; its PID 1 dies with it
            for f in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(Exception):
                    f.close()  # type: ignore[union-attr]
            proc.wait()
        if self._cgroups is not None:
            self._cgroups.remove()
            self._cgroups = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _error_of(line: str | None) -> str | None:
    if not line:
        return None
    with contextlib.suppress(ValueError):
        rec = json.loads(line)
        if isinstance(rec, dict) and "error" in rec:
            return str(rec["error"])
    return line


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m cmat_jax.sandbox", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "setup", help="build the cached root filesystem (if missing) and check a sandbox starts"
    )
    s.add_argument("--image", choices=[*IMAGES, "all"], default="default")
    s.add_argument("--rebuild", action="store_true", help="build again even when cached")
    args = ap.parse_args(argv)
    images = list(IMAGES) if args.image == "all" else [args.image]
    try:
        for image in images:
            if args.rebuild:
                build_rootfs(image, log=print)
            else:
                ensure_rootfs(image, log=print)
            t0 = time.perf_counter()
            with Sandbox(image) as sb:
                started = time.perf_counter() - t0
                out = sb.shell("id -u; hostname; python3 --version")
            print(
                f"{image}: {rootfs_path(image)} ok (sandbox start {started * 1000:.0f} ms; {' '.join(out.split())})"
            )
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
