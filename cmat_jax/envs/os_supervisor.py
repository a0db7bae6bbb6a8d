"""PID 1 of an OS-task sandbox (runs *inside* it, on the sandbox's own python3: stdlib only).

It owns the episode's persistent interactive bash (on a pseudo-terminal, as AgentBench's
``docker exec -it bash --login``) and runs the independent init / check scripts, answering one
JSON request per line on stdin with one JSON line on stdout:

- ``{"op": "shell", "cmd": str, "timeout": s}`` -> ``{"output": str, "timed_out": bool,
  "alive": bool}``: the command runs in the persistent shell (state, cwd and background jobs
  persist); past ``timeout`` it gets Ctrl-C, then its foreground process group is killed.
- ``{"op": "run", "argv": [...], "timeout": s}`` -> ``{"code": int, "output": str}``: a fresh
  process (own session, stdin /dev/null, stdout+stderr together), killed with its session
  past ``timeout``.

Being PID 1 of its PID namespace, nothing inside the sandbox can signal it (the kernel drops
signals to a namespace init that has no handler). When it exits the kernel kills every process
of the sandbox. (Like everything the checks rely on, it lives inside the sandbox: an agent set on
cheating could subvert its own scoring there, as in AgentBench; it cannot reach the host.)
"""

import contextlib
import fcntl
import json
import os
import pty
import re
import secrets
import select
import signal
import struct
import sys
import termios
import time

OUTPUT_CAP = 1 << 20  # bytes kept from one command / script
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "TERM": "xterm",
    "LANG": "C.UTF-8",
    "SHELL": "/bin/bash",
}
_exited = {}  # pid -> wait status of children we track
_tracked = set()


def _reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in _tracked:
            _exited[pid] = status


def _wait_exit(pid, deadline):
    while pid not in _exited and time.monotonic() < deadline:
        _reap()
        if pid not in _exited:
            time.sleep(0.005)
    return _exited.pop(pid, None)


def _kill_group(pgid):
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


class Shell:
    def __init__(self):
        self.token = secrets.token_hex(8)
        self.sentinel = re.compile(rb"\x1e" + self.token.encode() + rb":(\d+)\x1e")
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR  # "\n" stays "\n"
        attrs[3] &= ~(termios.ECHO | termios.ICANON)  # no echo; no 4 KiB line limit
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        env = dict(ENV, PROMPT_COMMAND=f'printf "\\036{self.token}:%s\\036" "$?"')
        pid = os.fork()
        if pid == 0:
            try:
                os.close(master)
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                if slave > 2:
                    os.close(slave)
                for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGXFSZ):
                    signal.signal(sig, signal.SIG_DFL)
                os.chdir("/")
                os.execve("/bin/bash", ["bash", "--login", "--noediting", "-i"], env)
            finally:
                os._exit(127)
        os.close(slave)
        _tracked.add(pid)
        self.pid, self.master, self.alive = pid, master, True
        self.buf, self.searched = bytearray(), 0  # output so far; how far it holds no prompt
        self._until_prompt(time.monotonic() + 30)
        self.execute("PS1=''; PS2=''; unset HISTFILE", 30)

    def _read_some(self, deadline):
        ready, _, _ = select.select(
            [self.master], [], [], max(0.0, min(deadline - time.monotonic(), 0.2))
        )
        data = None
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: no process holds the terminal any more
                data = b""
            self.buf += data
            if len(self.buf) > 2 * OUTPUT_CAP:  # keep the head and the tail of a flood
                del self.buf[OUTPUT_CAP : len(self.buf) - OUTPUT_CAP]
                self.searched = min(self.searched, OUTPUT_CAP)
        _reap()
        if self.pid in _exited and not data:
            _exited.pop(self.pid)
            self.alive = False

    def _take(self):
        out, self.buf, self.searched = bytes(self.buf), bytearray(), 0
        return out

    def _until_prompt(self, deadline):
        """Output up to the next prompt sentinel (None: the deadline passed or bash exited)."""
        while True:
            m = self.sentinel.search(self.buf, max(0, self.searched - 64))
            if m:
                out = bytes(self.buf[: m.start()])
                del self.buf[: m.end()]
                self.searched = 0
                return out
            self.searched = len(self.buf)
            if not self.alive or time.monotonic() >= deadline:
                return None
            self._read_some(deadline)

    def execute(self, cmd, timeout):
        if self.alive:
            os.write(self.master, ("eval $'" + _ansi_c_quote(cmd) + "'\n").encode())
            out = self._until_prompt(time.monotonic() + timeout)
            if out is not None:
                return out, False
        if not self.alive:  # bash exited (the agent ran `exit`): what it printed, then nothing
            out = self._take()
            return out, False
        # Past the time limit: Ctrl-C as a user would, then kill the foreground job.
        partial = self._take()
        os.write(self.master, b"\x03")
        out = self._until_prompt(time.monotonic() + 1.0)
        if out is None and self.alive:
            try:
                fg = os.tcgetpgrp(self.master)
            except OSError:
                fg = self.pid
            _kill_group(fg)
            out = self._until_prompt(time.monotonic() + 2.0)
        if out is None:
            out = self._take()
        return partial + out, True


def _ansi_c_quote(text):
    """The bytes of ``text`` inside bash's $'...' quoting (one line, any content)."""
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        c = chr(b)
        if 32 <= b < 127 and c not in "'\\":
            out.append(c)
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def run_script(argv, timeout):
    """Run to the exit of ``argv`` itself: background processes it leaves keep running (as
    after ``docker exec``), writing to a memory file nobody reads any more."""
    out_fd = os.memfd_create("script-output")
    try:
        pid = os.posix_spawnp(
            argv[0],
            argv,
            ENV,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, out_fd, 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGINT, signal.SIGXFSZ),
        )
    except OSError as e:
        os.close(out_fd)
        return 127, f"{argv[0]}: {e.strerror}\n"
    _tracked.add(pid)
    status = _wait_exit(pid, time.monotonic() + timeout)
    if status is None:  # past the limit: the script and everything in its session
        _kill_group(pid)
        status = _wait_exit(pid, time.monotonic() + 5)
    _tracked.discard(pid)
    out = os.pread(out_fd, OUTPUT_CAP, 0)
    os.close(out_fd)
    code = os.waitstatus_to_exitcode(status) if status is not None else -9
    return (code if code >= 0 else 128 - code), out.decode("utf-8", "replace")


def main():
    if len(sys.argv) > 1:  # the descriptor this program was read from: not for the children
        with contextlib.suppress(OSError):
            os.close(int(sys.argv[1]))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    os.chdir("/")
    shell = None
    requests, replies = sys.stdin.buffer, sys.stdout
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        req = json.loads(line)
        if req["op"] == "shell":
            if shell is None:
                shell = Shell()
            out, timed_out = shell.execute(req["cmd"], float(req["timeout"]))
            reply = {
                "output": out.decode("utf-8", "replace"),
                "timed_out": timed_out,
                "alive": shell.alive,
            }
        elif req["op"] == "run":
            code, out = run_script(list(req["argv"]), float(req["timeout"]))
            reply = {"code": code, "output": out}
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        _reap()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
