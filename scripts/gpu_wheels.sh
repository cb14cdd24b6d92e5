#!/usr/bin/env bash
# Run HERE (with the package registry), before a GPU run: download into .whl/ the cp312
# manylinux wheels of exactly what the lent GPU machine lacks and benchmarks/gpu_suite.py needs,
# print their total size, and fail if the tree that travels there would exceed 64 MiB.
#
# The GPU image has: torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26, numpy, pillow, pytest,
# pytest-benchmark, tqdm, regex, pyyaml, safetensors, timm, torchmetrics (Python 3.12.3, no
# network). It lacks open_clip_torch, ftfy, wcwidth, webdataset, braceexpand and DALI, and the
# suite needs none of them: the throughput benchmark feeds CLIP token ids (no BPE tokenizer),
# and nothing it runs reads webdataset shards. So the list below is empty; add a wheel as
# NAME==VERSION and every dependency it needs that the image lacks, each on its own line
# (--no-deps). tests/perf/test_gpu_suite.py reads this list: the CPU rehearsal may import
# only the image's packages plus these, so a missing entry fails CI, not the lease.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
)

LIMIT=$((64 * 1024 * 1024))
mkdir -p .whl
grep -qx '.whl/' .gitignore || echo '.whl/' >> .gitignore
rm -f .whl/*.whl
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
wheels=$(find .whl -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
echo "wheels: ${#WHEELS[@]} listed, $(find .whl -type f -name '*.whl' | wc -l) downloaded, ${wheels} bytes ($((wheels / 1024)) KiB) in .whl/"
# what travels: tracked and untracked-not-ignored files, plus the carried .whl/
tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((tree + wheels))
echo "working tree ${tree} bytes + wheels ${wheels} bytes = ${total} bytes ($((total / 1024 / 1024)) MiB) of the 64 MiB limit"
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: the tree that travels to the GPU machine exceeds 64 MiB" >&2
  exit 1
fi
