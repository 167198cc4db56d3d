#!/usr/bin/env bash
# Build the project with `--features cuda` on a machine with no GPU and no CUDA toolkit, using NVIDIA's
# CUDA 13.0 wheels from PyPI. Verified to build and link a candle-core 0.11.1 (+cuda) program on this kind of
# machine (about 8 minutes from scratch on 2 cores, most of it nvcc compiling candle's kernels); NOT yet run
# on a GPU. See README.md beside this script for what the GPU machine needs at run time.
# usage: scripts/build-cuda.sh [PROJECT_DIR] [extra cargo args...]     env: W (work dir, default /tmp/rae-cuda-env)
set -euo pipefail
PROJ=$(cd "${1:-.}" && pwd); shift || true
W=${W:-/tmp/rae-cuda-env}; mkdir -p "$W"; cd "$W"

# 1. CUDA 13.0 toolchain + libraries (all land in site-packages/nvidia/cu13/{bin,include,lib,nvvm}).
#    13.0.x on purpose: its PTX (9.0) loads on driver 580; cudarc 0.19 rejects nvcc 13.5.
if [ ! -x venv/bin/python ]; then python3 -m venv venv; fi
venv/bin/pip install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
CU13=$(venv/bin/python -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')

# 2. A CUDA_HOME-shaped directory: the wheels ship only libX.so.N (the linker wants libX.so), and no wheel
#    ships libcuda (the driver) -> a link-time stub with SONAME libcuda.so.1 whose functions all return
#    CUDA_ERROR_STUB_LIBRARY (34). Never ship the stub next to the binary: the real driver must be found.
(cd "$PROJ" && cargo fetch -q)
R=$W/cuda-root; rm -rf "$R"; mkdir -p "$R/lib/stubs"
ln -s "$CU13/bin" "$R/bin"; ln -s "$CU13/include" "$R/include"; ln -s "$CU13/nvvm" "$R/nvvm"
for f in "$CU13"/lib/*.so.*; do b=$(basename "$f"); ln -s "$f" "$R/lib/$b"; n=${b%%.so*}.so; [ -e "$R/lib/$n" ] || ln -s "$b" "$R/lib/$n"; done
# NCCL (only for `--features nccl`): cudarc 0.19's `nccl` feature binds the NCCL 2.30 API, so take the 2.30
# wheel; at run time any libnccl.so.2 >= 2.30 serves (PyTorch's, under site-packages/nvidia/nccl/lib).
case " $* " in *nccl*)
  venv/bin/pip install -q nvidia-nccl-cu13==2.30.7
  NCCL=$(venv/bin/python -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"nccl"))')
  ln -s "$NCCL/lib/libnccl.so.2" "$R/lib/libnccl.so.2"; ln -s libnccl.so.2 "$R/lib/libnccl.so"
  ln -s "$NCCL/include/nccl.h" "$CU13/include/nccl.h" 2>/dev/null || true
  export NCCL_HOME=$NCCL ;;
esac
src=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print $4}' | sort -u \
  | awk '{print "int "$1"(void){return 34;}"}' > "$W/libcuda_stub.c"
gcc -shared -fPIC -o "$R/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$W/libcuda_stub.c"
export LIBRARY_PATH=$R/lib/stubs:$R/lib${LIBRARY_PATH:+:$LIBRARY_PATH}

# 3. Build.
export CUDA_HOME=$R CUDA_PATH=$R CUDA_ROOT=$R CUDA_TOOLKIT_ROOT_DIR=$R PATH=$R/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # no nvidia-smi here; 90 = H100/H200 (built as sm_90a)
export CUDARC_CUDA_VERSION=13000                   # pin cudarc's bindings to CUDA 13.0 (driver 580)
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}   # parallel nvcc jobs in candle-kernels' build
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,\$ORIGIN/lib"   # libraries may be carried in ./lib
cd "$PROJ"
cargo build --release --features cuda "$@"
echo "built; run-time needs: libcuda.so.1 (driver), libcudart.so.13, libcublas.so.13 (+Lt), libcurand.so.10 (+ libnccl.so.2 with --features nccl)"
