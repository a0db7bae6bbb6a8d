"""First stage of an OS-task sandbox, run as a fresh interpreter (``python -I -S os_stage1.py
CONFIG_JSON``) by :class:`cmat_jax.envs.os_sandbox.Sandbox`; standard library only.

1. Applies the resource limits (they are inherited by everything the sandbox starts).
2. Enters a new user namespace and waits until the parent has mapped its ids (root inside =
   the unprivileged host id the root filesystem belongs to) and put it into cgroups.
3. In a private mount namespace mounts a size-limited tmpfs and, on it, an overlay whose
   read-only lower layer is the cached root filesystem: the sandbox's private writable root.
4. Becomes ``bwrap``, which adds PID / network / IPC / UTS / cgroup namespaces, /proc, a
   minimal /dev and the capability set, and runs the supervisor as the sandbox's PID 1.

Errors are reported as one JSON line ``{"error": ...}`` on stdout, then exit status 3.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_NOSUID = 0x2
MS_NODEV = 0x4

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(msg):
    sys.stdout.write(json.dumps({"error": msg}) + "\n")
    sys.stdout.flush()
    os._exit(3)


def _call(what, fn, *args):
    if fn(*args) != 0:
        err = ctypes.get_errno()
        _fail(f"{what}: {os.strerror(err)} (errno {err})")


def main():
    cfg = json.loads(sys.argv[1])
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir(cfg["rootfs"])  # the overlay's lower layer, named relative to this directory
    _call("creating a user namespace", _libc.unshare, CLONE_NEWUSER)
    sys.stdout.write("mapped?\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        _fail("the parent did not map the user namespace")
    try:
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
    except OSError as e:
        _fail(f"becoming root of the user namespace: {e.strerror}")
    _call("creating a mount namespace", _libc.unshare, CLONE_NEWNS)
    _call("making mounts private", _libc.mount, b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    stage = cfg["stage"].encode()
    tmpfs_opts = f"size={cfg['disk_bytes']},nr_inodes={cfg['inodes']},mode=0755".encode()
    _call("mounting the writable tmpfs", _libc.mount, b"tmpfs", stage, b"tmpfs",
          MS_NOSUID | MS_NODEV, tmpfs_opts)  # fmt: skip
    for sub in ("upper", "work", "root"):
        os.mkdir(os.path.join(cfg["stage"], sub))
    s = cfg["stage"]
    overlay_opts = f"lowerdir=.,upperdir={s}/upper,workdir={s}/work,userxattr".encode()
    _call("mounting the overlay root", _libc.mount, b"overlay", f"{s}/root".encode(),
          b"overlay", 0, overlay_opts)  # fmt: skip
    os.chdir("/")
    argv = [cfg["bwrap"], "--bind", f"{s}/root", "/", *cfg["bwrap_args"]]
    try:
        os.execve(cfg["bwrap"], argv, {})
    except OSError as e:
        _fail(f"starting bwrap: {e.strerror}")


if __name__ == "__main__":
    main()
