#!/usr/bin/env bash
# Set up (if needed) and run the main job: the end-to-end throughput benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python benchmarks/throughput.py "$@"
