#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (the device tool allows 10 minutes per call and
# 30 minutes per session): build the C++ core in place, run the GPU-relevant tests (the @cuda ones run
# there), then the kernel, encoder and perturbation benchmarks.
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
#   bash benchmarks/gpu_session.sh tests      # only the build and the tests
#
# The GPU image has torch/triton/pybind11/numba/pyarrow/transformers but not anndata or zarr, and no
# network, so nothing is pip-installed: the package runs from the checkout (PYTHONPATH) and tests that
# need anndata skip. Results go to $OUT/results (the device tool brings $OUT back), logs to $OUT/logs;
# copy the results into benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" "$OUT/results"
export SCFM_BENCH_RESULTS="$OUT/results" SCFM_FAST_PROGRESS=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

step() {  # step NAME CMD...: run, log to $OUT/logs/NAME.txt, print one status line and the log's tail
    local name=$1 t0 rc
    shift
    t0=$(date +%s)
    "$@" >"$OUT/logs/$name.txt" 2>&1
    rc=$?
    echo "== $name: rc=$rc, $(($(date +%s) - t0)) s"
    tail -n "${TAIL:-15}" "$OUT/logs/$name.txt"
    return 0
}

step env bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(0))'"
# the compiled core is only used by the tokenizer; without it the Numba path runs
step build $PY setup.py build_ext --inplace
TAIL=25 step tests $PY -m pytest -q -p no:cacheprovider -rs tests/kernels tests/model tests/perturb tests/embed tests/loader
[ "${1:-all}" = tests ] && exit 0
TAIL=14 step kernels $PY benchmarks/kernels.py
TAIL=14 step encoder $PY benchmarks/encoder.py --cells 512
TAIL=14 step perturb $PY benchmarks/perturb.py --device cuda
ls -l "$OUT/results"
