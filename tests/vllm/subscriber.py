"""A real ZMQ subscriber of vLLM's KV-event stream, run by tests/test_vllm.py in
the vLLM environment: ``python subscriber.py ENDPOINT OUT``. It binds a SUB
socket at ENDPOINT (vLLM's publisher, given a host without ``*``, connects
to it), prints READY, and writes each event of each batch as one JSON line
to OUT until it gets SIGTERM."""

from __future__ import annotations

import json
import signal
import sys

import msgspec
import zmq
from vllm.distributed.kv_events import KVEventBatch

stop = False


def _stop(*_: object) -> None:
    global stop
    stop = True


def _hash(h: object) -> str:
    return h.hex() if isinstance(h, bytes) else str(h)


def main() -> None:
    endpoint, out = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGTERM, _stop)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.bind(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    decode = msgspec.msgpack.Decoder(type=KVEventBatch)
    print("READY", flush=True)
    with open(out, "w") as f:
        while not stop:
            if not sub.poll(100):
                continue
            _topic, seq, payload = sub.recv_multipart()
            batch = decode.decode(payload)
            for e in batch.events:
                f.write(json.dumps({"seq": int.from_bytes(seq, "big"), "type": type(e).__name__,
                                    "hashes": [_hash(h) for h in getattr(e, "block_hashes", [])],
                                    "medium": getattr(e, "medium", None),
                                    "ownership": getattr(e, "ownership", None)}) + "\n")
            f.flush()
    sub.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
