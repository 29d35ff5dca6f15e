#!/usr/bin/env bash
# Replay whole traces from ../shared/traces through a BlockManager.
set -euo pipefail
dir="${1:-${TMPDIR:-/tmp}}"
traces="${DYNBLOCK_TRACE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/traces}"
set -x
for t in mooncake_conversation mooncake_synthetic; do
  python3 -m dynblock.bench --workloads trace --dir "$dir" --trace "$traces/$t.jsonl" \
    --trace-requests 0 --payload 64KiB --trace-host-blocks 4096 --trace-disk-blocks 65536 \
    --repeat 1 --out "trace_$t.json"
done
