#!/usr/bin/env bash
# scfm_fast developer entry point.
#   ./dev.sh demo   set up .venv (first time) and run the main job on the bundled real PBMC data
#   ./dev.sh test   set up .venv (first time) and run the test suite
#   ./dev.sh setup  only set up .venv
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SCFM_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if [ ! -f "$VENV/.scfm_installed" ] || [ pyproject.toml -nt "$VENV/.scfm_installed" ] \
     || [ setup.py -nt "$VENV/.scfm_installed" ] || [ -n "$(find csrc -newer "$VENV/.scfm_installed" 2>/dev/null)" ]; then
    python -m pip install -q --upgrade pip
    # CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build)
    python -m pip install -q -c .ci/constraints.txt "torch==2.13.0"
    python -m pip install -q -c .ci/constraints.txt -e ".[test]"
    touch "$VENV/.scfm_installed"
  fi
}

cmd=${1:-help}
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    out=${2:-demo_out}
    rm -rf "$out"
    scfm info
    scfm tokenize scfm_fast/data/demo/pbmc_200cells.h5ad --out "$out/tokens" --preset geneformer-v1 \
      --obs-columns n_genes
    python -m scfm_fast.demo "$out"
    ;;
  test)
    setup
    shift || true
    python -m pytest -q "$@"
    ;;
  *) sed -n '2,6p' "$0"; exit 1 ;;
esac
