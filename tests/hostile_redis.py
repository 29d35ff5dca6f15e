"""A hostile Redis peer for the engine-path tests: a small RESP server on a loopback port that
stores SET/GET/EXISTS/DEL like Redis and then misbehaves on demand. It is the peer the tests are
about (a slow link, a broken or malicious server), not a stand-in for Redis: the remote tier's
behaviour against real servers is tested in test_remote.py.

Modes (``server.mode = ...``): "ok"; "fragment" (every reply in pieces of random sizes, from one
byte to a few KiB, a fraction of a millisecond apart); "trickle" (every reply one byte per
``trickle_s``);
"stall" (reads commands, never answers); "huge" (GET answers a bulk string announced as 6 GiB
and streams zeros until the client goes); "moved" (a cluster whose only node answers every key
command with MOVED to itself, forever). ``server.flip = i`` makes every GET's value arrive with
its byte ``i`` changed."""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Dict, List, Optional


def _bulk(b: Optional[bytes]) -> bytes:
    return b"$-1\r\n" if b is None else b"$%d\r\n%s\r\n" % (len(b), b)


class HostileRedis:
    def __init__(self) -> None:
        self.mode = "ok"
        self.trickle_s = 0.05
        self.flip: Optional[int] = None
        self.data: Dict[bytes, bytes] = {}
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)

    def _read_command(self, f) -> Optional[List[bytes]]:
        line = f.readline()
        if not line:
            return None
        assert line[:1] == b"*", line
        args = []
        for _ in range(int(line[1:])):
            n = int(f.readline()[1:])
            args.append(f.read(n + 2)[:n])
        return args

    def _reply(self, args: List[bytes]) -> bytes:
        cmd = args[0].upper()
        if cmd == b"PING":
            return b"+PONG\r\n"
        if cmd == b"CLUSTER":
            node = b"*3\r\n" + _bulk(b"127.0.0.1") + b":%d\r\n" % self.port + _bulk(b"n1")
            return b"*1\r\n*3\r\n:0\r\n:16383\r\n" + node
        if self.mode == "moved" and cmd in (b"GET", b"SET", b"EXISTS", b"DEL"):
            return b"-MOVED 866 127.0.0.1:%d\r\n" % self.port
        if cmd == b"SET":
            self.data[args[1]] = args[2]
            return b"+OK\r\n"
        if cmd == b"GET":
            v = self.data.get(args[1])
            if v is not None and self.flip is not None:
                v = v[:self.flip] + bytes([v[self.flip] ^ 0x5A]) + v[self.flip + 1:]
            return _bulk(v)
        if cmd == b"EXISTS":
            return b":%d\r\n" % sum(a in self.data for a in args[1:])
        if cmd == b"DEL":
            return b":%d\r\n" % sum(self.data.pop(a, None) is not None for a in args[1:])
        return b"-ERR unknown command\r\n"

    def _serve(self, c: socket.socket) -> None:
        f = c.makefile("rb")
        try:
            while not self._stop.is_set():
                args = self._read_command(f)
                if args is None:
                    return
                if self.mode == "stall":
                    continue
                if self.mode == "huge" and args[0].upper() == b"GET":
                    c.sendall(b"$6442450944\r\n")
                    zeros = bytes(1 << 20)
                    while not self._stop.is_set():
                        c.sendall(zeros)  # until the client drops the connection
                    return
                out = self._reply(args)
                if self.mode == "fragment":
                    i = 0
                    while i < len(out):
                        n = random.choice((1, 2, 3, 7, 61, 1000, 4099, 7000))
                        c.sendall(out[i:i + n])
                        i += n
                        time.sleep(0.0003)
                elif self.mode == "trickle":
                    for i in range(len(out)):
                        c.sendall(out[i:i + 1])
                        time.sleep(self.trickle_s)
                else:
                    c.sendall(out)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
