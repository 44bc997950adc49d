#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: every csrc/cuda/*.cu through nvcc -c for sm_90, against the headers of a
# CUDA build of torch, with the flags torch.utils.cpp_extension uses. Needs nvcc, no GPU; links nothing.
#
#   bash csrc/check_cuda_compile.sh            # exit 0: all compiled; 1: a compile error; 2: cannot check here
#
# Environment:
#   SIMCROP_CUDA_VENV   venv holding the CUDA torch (default .cache/cuda-venv; created when missing)
#   SIMCROP_CUDA_TORCH  pip requirement of that torch (default torch==2.14.1, a CUDA 13 wheel on local disk)
#   CUDA_HOME           the toolkit (default: the directory above nvcc's real location, else /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (H100/H200)
#   NVCC_JOBS           parallel nvcc processes (default 2)
# The venv is a plain `pip install torch==2.14.1` (from local disk here: ~50 s, 5.4 GB; kept for the next run).
# Its nvidia-* wheels bring the cuBLAS/cuSPARSE/cuSOLVER headers that ATen's CUDA headers include
# (site-packages/nvidia/cu13/include, put on CPATH). torch is imported only to read its nvcc flags.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SIMCROP_CUDA_VENV:-$ROOT/.cache/cuda-venv}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
TORCH_REQ=${SIMCROP_CUDA_TORCH:-torch==2.14.1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: SKIP: nvcc not found (install the CUDA toolkit or set CUDA_HOME)" >&2
  exit 2
fi
if [ -z "${CUDA_HOME:-}" ]; then
  # nvcc may be a wrapper script (exec /usr/local/cuda-13.0/bin/nvcc "$@"): ask nvcc itself where it lives
  top=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  CUDA_HOME=$(cd "${top:-/usr/local/cuda}" 2>/dev/null && pwd || echo /usr/local/cuda)
fi
export CUDA_HOME

t0=$SECONDS
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  echo "check_cuda_compile: creating $VENV with $TORCH_REQ"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_REQ"
  echo "check_cuda_compile: venv ready in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"

# nvcc flags as torch.utils.cpp_extension builds a CUDAExtension (include paths, arch, half/bf16 macros, ABI)
mapfile -t FLAGS < <(cd /tmp && "$VENV/bin/python" - <<'PY' 2>"$VENV/.flags.err"
import torch
import torch.utils.cpp_extension as ce
flags = [f"-I{p}" for p in ce.include_paths(device_type="cuda")]
flags += ce.COMMON_NVCC_FLAGS + ce._get_cuda_arch_flags()
flags += ["-std=c++20", "--compiler-options", "-fPIC", "-O3", "-lineinfo",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
          "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DSIMCROP_WITH_CUDA"]
print("\n".join(flags))
PY
)  # (run from /tmp so that this checkout's simcrop/ is not imported; errors show as "no CUDA torch" below)
if [ "${#FLAGS[@]}" -eq 0 ]; then
  echo "check_cuda_compile: SKIP: no CUDA torch usable in $VENV: $(tail -1 "$VENV/.flags.err")" >&2
  exit 2
fi
echo "check_cuda_compile: $("$NVCC" --version | tail -1), CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST, torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mapfile -t SOURCES < <(cd "$ROOT" && ls csrc/cuda/*.cu)
t1=$SECONDS
# one nvcc per file, NVCC_JOBS at a time; the log of each failure is printed
printf '%s\n' "${SOURCES[@]}" | xargs -P "${NVCC_JOBS:-2}" -I{} bash -c '
  src=$1; shift; out=$1; shift; nvcc=$1; shift; root=$1; shift
  log="$out/$(basename "$src").log"
  if "$nvcc" -c "$root/$src" -o "$out/$(basename "$src").o" -I"$root/csrc/include" "$@" >"$log" 2>&1; then
    echo "  ok    $src"
  else
    echo "  FAIL  $src"; cat "$log"; exit 1
  fi' _ {} "$OUT" "$NVCC" "$ROOT" "${FLAGS[@]}" || {
  echo "check_cuda_compile: FAILED after $((SECONDS - t1)) s" >&2
  exit 1
}
echo "check_cuda_compile: ${#SOURCES[@]} file(s) compiled for sm_${TORCH_CUDA_ARCH_LIST//./} in $((SECONDS - t1)) s (total $((SECONDS - t0)) s)"
