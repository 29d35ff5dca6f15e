"""A TCP proxy on loopback that delays every chunk by half a round trip each way: a server
`rtt_s` away. Used by lookup_rtt.py and vllm_rtt.py."""
import queue
import socket
import threading
import time


class DelayProxy:
    def __init__(self, upstream_port: int, rtt_s: float) -> None:
        self.up, self.half = upstream_port, rtt_s / 2
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.up))
            for a, b in ((c, u), (u, c)):
                q: "queue.Queue[tuple]" = queue.Queue()
                threading.Thread(target=self._read, args=(a, q), daemon=True).start()
                threading.Thread(target=self._write, args=(b, q), daemon=True).start()

    def _read(self, s: socket.socket, q: "queue.Queue[tuple]") -> None:
        while True:
            try:
                d = s.recv(1 << 20)
            except OSError:
                d = b""
            q.put((time.monotonic() + self.half, d))
            if not d:
                return

    def _write(self, s: socket.socket, q: "queue.Queue[tuple]") -> None:
        while True:
            due, d = q.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not d:
                    s.shutdown(socket.SHUT_WR)
                    return
                s.sendall(d)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
