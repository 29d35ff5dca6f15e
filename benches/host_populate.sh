#!/usr/bin/env bash
# Host tier: batched copies and population of a 4 GiB tier (needs ~10 GiB free memory).
set -euo pipefail
set -x
python3 -m dynblock.bench --workloads host --host-size 1GiB --populate-size 4GiB \
  --repeat 5 --out host_populate.json
