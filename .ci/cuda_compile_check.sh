#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu against the installed torch's headers without a GPU or a CUDA
# build of torch. The CPU wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); a
# one-line stand-in is put on the include path. Usage: .ci/cuda_compile_check.sh [python]
set -euo pipefail
py=${1:-python}
nvcc=$(command -v nvcc || true)
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc" ]; then echo "cuda compile-check: nvcc not found, skipped"; exit 0; fi
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$("$py" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
abi=$("$py" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
status=0
for cu in "$top"/csrc/cuda/*.cu; do
  echo "cuda compile-check: $(basename "$cu") with $("$nvcc" --version | tail -1)"
  if ! "$nvcc" -c "$cu" -o "$work/$(basename "$cu").o" -std=c++20 -O2 -arch=sm_90 \
      -D_GLIBCXX_USE_CXX11_ABI="$abi" -DLANDSCAPE_KERNELS_WITH_CUDA \
      -I"$work/stub" $includes -I"$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
      --expt-relaxed-constexpr -Xcompiler -fPIC; then
    echo "cuda compile-check: FAILED for $cu"; status=1
  fi
done
[ $status -eq 0 ] && echo "cuda compile-check: all CUDA sources compiled"
exit $status
