#!/usr/bin/env bash
# Replay the whole shipped Mooncake traces through a BlockManager
# (set DYNBLOCK_TRACE_DIR to replay other files of the same names).
set -euo pipefail
dir="${1:-${TMPDIR:-/tmp}}"
set -x
for t in mooncake_conversation mooncake_synthetic; do
  python3 -m dynblock.bench --workloads trace --dir "$dir" --trace "$t" \
    --trace-requests 0 --payload 64KiB --trace-host-blocks 4096 --trace-disk-blocks 65536 \
    --repeat 1 --out "trace_$t.json"
done
