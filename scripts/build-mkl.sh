#!/usr/bin/env bash
# Build rae-cache with candle's MKL backend (`--features mkl`) from Intel's
# oneMKL wheels on PyPI, with no other download: intel-mkl-src finds the
# static libraries through MKLROOT and never falls back to fetching them.
#
#   scripts/build-mkl.sh [cargo args...]     # default: build --release --features mkl
#   MKL_VENV=/opt/mkl scripts/build-mkl.sh test --release --features mkl
#
# Needs: python3 with venv + pip (PyPI reachable). The binary records
# $MKL_VENV/lib as its rpath (build.rs) for libiomp5.so.
set -euo pipefail
cd "$(dirname "$0")/.."
MKL_VENV="${MKL_VENV:-$PWD/.venv-mkl}"
if [ ! -f "$MKL_VENV/lib/libmkl_core.a" ]; then
    python3 -m venv "$MKL_VENV"
    "$MKL_VENV/bin/pip" install --quiet --disable-pip-version-check mkl-static mkl-include intel-openmp
fi
for f in libmkl_core.a libmkl_intel_lp64.a libmkl_intel_thread.a libiomp5.so; do
    [ -f "$MKL_VENV/lib/$f" ] || { echo "build-mkl: $MKL_VENV/lib/$f missing after pip install" >&2; exit 1; }
done
export MKLROOT="$MKL_VENV"
if [ $# -eq 0 ]; then set -- build --release --features mkl; fi
cargo "$@"
