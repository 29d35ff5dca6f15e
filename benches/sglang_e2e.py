"""End to end on a GPU: a real SGLang server with HiCache and dynblock as its
L3 serves a long prompt's prefix from dynblock after its GPU and host caches
are flushed.

    python benches/sglang_e2e.py [--model MODEL] [--dir DIR] [--tokens N]

What it does:
1. starts ``python -m sglang.launch_server`` on loopback with
   ``--enable-hierarchical-cache --hicache-write-policy write_through``, a
   ``page_first`` host layout and ``DynblockHiCache`` (zero-copy, a persistent
   disk-only store under ``--dir``) as the L3 backend;
2. sends a prompt of ``--tokens`` random token ids (one output token);
3. waits until the server's L3 holds the prompt (the store's block count, read
   from its index without its lock as ``python -m dynblock.store info`` does,
   stops growing), then flushes the GPU and host caches (``POST /flush_cache``);
4. sends the same prompt again and reads ``meta_info.cached_tokens_details``:
   the tokens served from L3 (``storage``) and by which backend.

It prints ``PASS`` with those counts when the second request's cached tokens
came from dynblock and exits 0; ``FAIL`` and exits 1 otherwise. Where it
cannot run (no GPU, SGLang's GPU build not installed, the model not
available), it prints ``SKIPPED: <reason>`` and exits 77, and claims nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, NoReturn

SKIP = 77


def skip(why: str) -> NoReturn:
    print(f"SKIPPED: {why}", flush=True)
    sys.exit(SKIP)


def preflight() -> None:
    try:
        import torch
    except ImportError as e:
        skip(f"torch is not installed: {e}")
    if not torch.cuda.is_available():
        skip("no GPU: torch.cuda.is_available() is False")
    for mod in ("sglang", "sgl_kernel", "dynblock.sglang"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
        if r.returncode != 0:
            skip(f"`import {mod}` fails (SGLang's GPU build and dynblock must be installed): "
                 f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, body: Any = None, timeout: float = 600) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def generate(base: str, ids: List[int]) -> Dict[str, Any]:
    out = call(f"{base}/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1,
                                                                         "temperature": 0}})
    return dict(out["meta_info"])


def wait_for_backup(store: str, timeout: float = 120.0) -> int:
    """Blocks in the rank's store once their count has stopped growing for 3 s."""
    from dynblock.store import Refused, info

    last, since, end = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            n = int(info(store)["blocks"])
        except Refused:
            n = 0
        if n != last:
            last, since = n, time.monotonic()
        elif n > 0 and time.monotonic() - since >= 3:
            return n
        time.sleep(0.5)
    return last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct",
                   help="a model SGLang can load here (a local path or a cached hub id)")
    p.add_argument("--dir", help="where dynblock's store goes (default: a temporary directory)")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (default: 4096)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the server to start")
    a = p.parse_args()
    preflight()
    work = a.dir or tempfile.mkdtemp(prefix="dynblock-sglang-e2e-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = os.path.join(work, "l3.kv")
    extra: Dict[str, Any] = {"backend_name": "dynblock", "module_path": "dynblock.sglang",
             "class_name": "DynblockHiCache", "interface_v1": 1, "host_blocks": 0,
             "disk_bytes": 8 << 30, "persist": True, "disk_path": store}
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", a.model,
           "--host", "127.0.0.1", "--port", str(port), "--page-size", "64",
           "--enable-hierarchical-cache", "--hicache-ratio", "2",
           "--hicache-write-policy", "write_through", "--hicache-mem-layout", "page_first",
           "--hicache-storage-backend", "dynamic",
           "--hicache-storage-backend-extra-config", json.dumps(extra)]
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + a.timeout
        while True:
            if server.poll() is not None:
                tail = open(os.path.join(work, "server.log")).read()[-3000:]
                if "OSError" in tail and ("not a local folder" in tail or "huggingface" in tail.lower()):
                    skip(f"the model {a.model} is not available here:\n{tail}")
                print(f"FAIL: the server exited (rc {server.returncode}):\n{tail}")
                return 1
            try:
                call(f"{base}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > end:
                    print("FAIL: the server did not become healthy in time")
                    return 1
                time.sleep(2)
        rng = random.Random(0)
        ids = [rng.randrange(100, 20000) for _ in range(a.tokens)]
        first = generate(base, ids)
        stored = wait_for_backup(store + ".tp0of1")
        flushed = call(f"{base}/flush_cache", {}, timeout=60)
        second = generate(base, ids)
        details = second.get("cached_tokens_details") or {}
        storage = int(details.get("storage") or 0)
        backend = details.get("storage_backend")
        report = {"first": {k: first.get(k) for k in ("prompt_tokens", "cached_tokens")},
                  "dynblock_blocks_before_flush": stored,
                  "flush_cache": flushed, "second": {"prompt_tokens": second.get("prompt_tokens"),
                                                     "cached_tokens": second.get("cached_tokens"),
                                                     "details": details}}
        print(json.dumps(report, indent=1))
        if storage > 0 and backend in ("DynblockHiCache", "HiCacheStorageFailureInjector"):
            print(f"PASS: {storage} of {len(ids)} prompt tokens came back from dynblock ({backend})")
            return 0
        print(f"FAIL: the second request's cached tokens did not come from dynblock "
              f"(storage={storage}, backend={backend}); server log: {work}/server.log")
        return 1
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
