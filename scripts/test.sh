#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Triton runs in its interpreter on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q tests "$@"
