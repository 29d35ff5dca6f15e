"""Real Redis or Valkey server processes on loopback ports for the tests (test_remote.py, the
remote model machine in test_manager.py): started in a directory of their own, stopped by the
test. A missing server or cli skips the test that needs it, saying so."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

import pytest


# The servers the remote tier is tested against: one protocol, two implementations.
KINDS = ("redis", "valkey")
_INSTALL = {
    "redis": "apt-get install redis-server redis-tools",
    "valkey": "on Debian 12: apt-get install -t bookworm-backports valkey-server valkey-tools",
}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        kind = tool.split("-")[0]
        pytest.skip(f"{tool} is not installed ({_INSTALL.get(kind, 'apt-get install ' + tool)})")
    return path


def _ephemeral_range() -> "tuple[int, int]":
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A loopback port that is free now, and whose port + 10000 (a cluster node's bus) is too,
    both below the kernel's ephemeral range: a port the kernel handed out for a bind to port 0
    may meanwhile become the local end of an outgoing connection (a client's, a cluster bus's),
    and the server's bind would then fail (seen once in a run as a cluster fixture error)."""
    lo, _ = _ephemeral_range()
    top = min(lo, 65536) - 10000 - 1
    if top < 11000:  # an ephemeral range that leaves no room below it: anywhere then
        top = 55535
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(10000, top)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError(f"no free loopback port pair (p, p + 10000) below {lo}")


class PortTaken(RuntimeError):
    """The server could not bind its port (taken between choosing and starting)."""


class Server:
    """One server process (``kind``: "redis" or "valkey") on 127.0.0.1, in its own directory."""

    def __init__(self, directory: Path, extra: List[str], port: Optional[int] = None,
                 tls: bool = False, kind: str = "redis") -> None:
        self.kind = kind
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.tls = tls
        self.proc: Optional[subprocess.Popen] = None
        for attempt in range(5):
            try:
                self.start()
                return
            except PortTaken:
                if port is not None or attempt == 4:
                    raise
                self.port = free_port()  # taken since it was chosen: another one

    def start(self) -> None:
        port_args = (["--port", "0", "--tls-port", str(self.port)] if self.tls
                     else ["--port", str(self.port)])
        log_path = self.dir / "log"
        start_at = log_path.stat().st_size if log_path.exists() else 0
        self.proc = subprocess.Popen(
            [need(f"{self.kind}-server"), *port_args, "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.extra],
            stdout=open(self.dir / "log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                with open(log_path, "rb") as f:  # what this start wrote
                    f.seek(start_at)
                    log = f.read().decode(errors="replace")[-2000:]
                if "Address already in use" in log:
                    raise PortTaken(f"{self.kind}-server could not bind {self.port}: {log}")
                raise RuntimeError(f"{self.kind}-server exited: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c:
                    if not self.tls:  # this server answers there, not something else
                        c.sendall(b"PING\r\n")
                        if not c.recv(64).startswith((b"+PONG", b"-NOAUTH", b"-LOADING")):
                            raise OSError("no PONG")
                if self.proc.poll() is None:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind}-server did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str, user: Optional[str] = None, password: Optional[str] = None) -> str:
        cmd = [need(f"{self.kind}-cli"), "-p", str(self.port)]
        if user:
            cmd += ["--user", user]
        if password:
            cmd += ["--pass", password, "--no-auth-warning"]
        r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
