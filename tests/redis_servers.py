"""Real Redis or Valkey server processes on loopback ports for the tests (test_remote.py, the
remote model machine in test_manager.py): started in a directory of their own, stopped by the
test. A missing server or cli skips the test that needs it, saying so."""

from __future__ import annotations

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


def free_port() -> int:
    # At most 55535: a cluster node also listens on its port + 10000.
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 55535:
            return port
    raise RuntimeError("no free loopback port at or below 55535")


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
        self.start()

    def start(self) -> None:
        port_args = (["--port", "0", "--tls-port", str(self.port)] if self.tls
                     else ["--port", str(self.port)])
        self.proc = subprocess.Popen(
            [need(f"{self.kind}-server"), *port_args, "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.extra],
            stdout=open(self.dir / "log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind}-server exited: {(self.dir / 'log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
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
