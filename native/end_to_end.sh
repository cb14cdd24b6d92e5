#!/usr/bin/env bash
# ctest's end-to-end check of flowtok-run: a tiny random-weights package (a few minutes of
# AOTInductor compilation on a CPU), two prompts, and the runner's images must equal the Python
# package pipeline's for the same ids and noise.  usage: end_to_end.sh PYTHON FLOWTOK_RUN WORKDIR
set -euo pipefail
python=$1 runner=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
"$python" -m flowtok_fast.deploy.export --random-weights --config tiny --batch 2 --steps 2 --dtype fp32 --out "$work/pkg"
"$python" -m flowtok_fast.deploy.tokenize_ids --prompt "a red bicycle" --prompt "two cats" --prompt "a house" \
    --seed 3 --out "$work/ids.txt" --noise-out "$work/noise.bin"
"$runner" "$work/pkg" "$work/ids.txt" "$work/noise.bin" "$work/images"
"$python" -m flowtok_fast.deploy.compare_runner "$work/pkg" "$work/ids.txt" "$work/noise.bin" "$work/images"
