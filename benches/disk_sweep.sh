#!/usr/bin/env bash
# Disk-tier sweep at sizes that take a few minutes. Release build only.
set -euo pipefail
dir="${1:-${TMPDIR:-/tmp}}"
set -x
python3 -m dynblock.bench --dir "$dir" --block-size 64KiB --block-size 256KiB --block-size 2MiB \
  --blocks 512 --repeat 5 --out disk_sweep.json
