#!/usr/bin/env bash
# GPU checks of simcrop on the lent machine (one H100/H200, torch 2.11+ with CUDA, no network, no DALI/MONAI).
#
#   bash bench/gpu_check.sh                 # every section
#   bash bench/gpu_check.sh ext             # only the named sections
#
# Each section is a function section_<name> made of `step <name> <command...>` calls; a step's log goes to
# $RESULTS/<name>.log and a failing step does not stop the others. At the end: a table of the steps, then the
# benchmark table of every $RESULTS/bench_*.json (median, spread, ratio to the group's `compiled` provider).
# To add a section: write section_<name>, append <name> to SECTIONS.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
RESULTS=${RESULTS:-${OUT:-$ROOT/.cache/gpu_check}}
mkdir -p "$RESULTS"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$RESULTS/inductor}
SECTIONS=(ext triton)
STEPS=()

step() {  # step <name> <command...>: run, log, record status and seconds
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  tail -n 15 "$RESULTS/$name.log"
  STEPS+=("$name|$([ $rc -eq 0 ] && echo ok || echo "FAIL rc=$rc")|$((SECONDS - t0))")
  return $rc
}

# -- C++/CUDA extension (csrc/): build against this machine's torch, CUDA tests, benchmarks --------------------
build_ext() {
  # --no-deps: no network here; the build decides CUDA from torch.version.cuda + CUDA_HOME, FORCE makes it loud
  SIMCROP_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install --no-build-isolation --no-deps -e . ||
    SIMCROP_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --inplace  # old setuptools / no pip
  "$PY" -c 'from simcrop.ops.extension import has_cuda_ext, check_device as c; assert has_cuda_ext(), c("cuda"); print("simcrop._C with CUDA kernels")'
}

section_ext() {
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  step ext_build build_ext || return
  step ext_tests "$PY" -m pytest tests/ops/test_patchify.py tests/ops/test_masked_mse.py -m cuda -q -p no:cacheprovider
  step ext_bench "$PY" -m pytest bench/bench_patchify.py --benchmark-only -k cuda -q -p no:cacheprovider \
    --benchmark-json "$RESULTS/bench_patchify.json" --benchmark-columns=median,iqr,min,rounds
}

# -- Triton ops (kernels/): bench/gpu_check_triton.sh, which writes $RESULTS/bench_triton.json -----------------------
section_triton() {
  step triton bash bench/gpu_check_triton.sh "$RESULTS"
}

print_tables() {
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  for s in "${STEPS[@]}"; do echo "| ${s//|/ | } |"; done
  "$PY" - "$RESULTS"/bench_*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        benches = json.load(open(path))["benchmarks"]
    except (OSError, ValueError, KeyError):
        continue
    groups = {}
    for b in benches:
        groups.setdefault(b["group"], []).append(b)
    print(f"\n{path.rsplit('/', 1)[-1]}\n| group | provider | median ms | IQR ms | x vs compiled | peak MiB |")
    print("|---|---|---|---|---|---|")
    for group, items in groups.items():
        base = {b["param"].split("-")[-1]: b["stats"]["median"] for b in items}.get("compiled")
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            provider, st = b["param"].split("-")[-1], b["stats"]
            ratio = f"{base / st['median']:.2f}" if base else "-"
            mem = b.get("extra_info", {}).get("peak_mem_MiB")
            mem = f"{mem:.0f}" if mem is not None else "-"
            print(f"| {group} | {provider} | {st['median'] * 1e3:.3f} | {st['iqr'] * 1e3:.3f} | {ratio} | {mem} |")
PY
}

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${SECTIONS[@]}")
for s in "${wanted[@]}"; do
  if declare -F "section_$s" >/dev/null; then
    "section_$s"
  else
    echo "unknown section: $s (known: ${SECTIONS[*]})"
    STEPS+=("$s|FAIL unknown section|0")
  fi
done
print_tables
for s in "${STEPS[@]}"; do [[ $s == *"|ok|"* ]] || exit 1; done
