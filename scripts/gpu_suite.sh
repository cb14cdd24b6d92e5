#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE, from the repository root (see docs/PERFORMANCE.md, "Running on a
# lent GPU"): install the carried wheels and this package without touching the image's torch,
# then run benchmarks/gpu_suite.py (at most 540 s). Results go to $OUT when set, else
# results/gpu_suite/; the summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-results/gpu_suite}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# never requirements.txt: it pins another torch. --no-build-isolation: the image's setuptools.
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . ; then
  # no usable setuptools there: make kernels/ importable as flowtok_fast.kernels by hand
  echo "warning: pip install -e . failed; using PYTHONPATH and a flowtok_fast/kernels link instead" >&2
  ln -sfn ../kernels flowtok_fast/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import flowtok_fast.kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" || exit 1
"$PY" benchmarks/gpu_suite.py --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_suite.log"
exit "${PIPESTATUS[0]}"
