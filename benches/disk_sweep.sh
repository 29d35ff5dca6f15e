#!/usr/bin/env bash
# Disk-tier sweep at sizes that take several minutes. Release build only.
set -euo pipefail
dir="${1:-${TMPDIR:-/tmp}}"
plot=()
python3 -c 'import matplotlib' 2>/dev/null && plot=(--plot disk_sweep.png)
set -x
python3 -m dynblock.bench --workloads disk --dir "$dir" \
  --block-sizes 64KiB,256KiB,2MiB --patterns random,sequential --disk-size 1GiB \
  --fio-depths 1,4,16,32,64 --repeat 5 --out disk_sweep.json "${plot[@]}"
