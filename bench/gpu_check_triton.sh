#!/usr/bin/env bash
# Triton section of the GPU check: called from bench/gpu_check.sh, runs on its own too.
#   1. the CUDA tests of the two Triton ops (fp32 / bf16 / fp16 at odd sizes, the paper's shapes and the limits,
#      against float64), plus opcheck, torch.compile and the tiny model fused vs reference, on the GPU (the rest of
#      those files is CPU CI's job: run them all with SIMCROP_GPU_CHECK_ALL=1);
#   2. their benchmarks at the paper's shapes: reference / torch.compile(reference) / SDPA / Triton / xformers,
#      forward and backward, median time and peak memory, printed as one table; OUT_DIR/bench_triton.json also
#      feeds gpu_check.sh's summary of bench_*.json.
# Usage: bash bench/gpu_check_triton.sh [OUT_DIR]
# Needs: a CUDA GPU, torch 2.11+, triton 3.6, pytest-benchmark; no network. About 2-3 minutes on an H100.
# DRY_RUN=1 (bench/gpu_check.sh --dry-run): no GPU; the test selection is only collected, the benchmarks run at the
# small size with the reference provider for one round on the CPU, and the table is printed from their JSON.
# TRITON_TESTS_TIMEOUT / TRITON_BENCH_TIMEOUT (seconds, default 150 / 180) bound the two parts.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${RESULTS:-${OUT:-.cache/gpu_check}}}"  # gpu_check.sh passes its RESULTS
PY="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.cache/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"

DRY_RUN="${DRY_RUN:-0}"
"$PY" -c "
import torch, triton
dry = '$DRY_RUN' == '1'
assert dry or torch.cuda.is_available(), 'gpu_check_triton.sh needs a CUDA GPU'
device = 'CPU (dry run)' if dry else torch.cuda.get_device_name()
print(f'== triton ops: torch {torch.__version__}, triton {triton.__version__}, {device}')
"
if ! "$PY" -c "import simcrop.kernels" 2>/dev/null; then  # kernels/ is importable only as installed simcrop.kernels
  echo "== installing simcrop (editable) for simcrop.kernels"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi

status=0
SECONDS=0
echo "== triton ops: tests on the GPU"
SELECT="cuda or opcheck or fullgraph or tiny_model"
[ "${SIMCROP_GPU_CHECK_ALL:-0}" = 1 ] && SELECT="not compile_for_sm90"
TEST_ARGS=(--junitxml="$OUT/triton_tests.xml")
BENCH_ENV=(SIMCROP_BENCH_SIZES=paper)
if [ "$DRY_RUN" = 1 ]; then
  TEST_ARGS=(--collect-only)  # the selection must still exist (pytest exits 5 when nothing is selected)
  BENCH_ENV=(SIMCROP_BENCH_SIZES=small SIMCROP_BENCH_PROVIDERS=reference SIMCROP_BENCH_ROUNDS=1)
fi
timeout "${TRITON_TESTS_TIMEOUT:-150}" "$PY" -m pytest tests/ops/test_topk_align.py \
  tests/ops/test_cross_granularity_attention.py -q -p no:cacheprovider -k "$SELECT" "${TEST_ARGS[@]}" \
  > "$OUT/triton_tests.log" 2>&1 || status=1
tail -n 15 "$OUT/triton_tests.log"

echo "== triton ops: benchmarks at the paper's shapes (tests took ${SECONDS}s)"
env "${BENCH_ENV[@]}" timeout "${TRITON_BENCH_TIMEOUT:-180}" "$PY" -m pytest bench/bench_topk_align.py \
  bench/bench_cross_granularity_attention.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_triton.json" > "$OUT/bench_triton.log" 2>&1 || status=1
grep -E "passed|failed|error" "$OUT/bench_triton.log" | tail -n 3 || true

[ -s "$OUT/bench_triton.json" ] || { echo "no benchmark results: see $OUT/bench_triton.log"; exit 1; }
"$PY" - "$OUT/bench_triton.json" <<'EOF' | tee "$OUT/bench_triton.txt"
import json, sys

data = json.load(open(sys.argv[1]))
rows = {}
for b in data["benchmarks"]:
    provider = b["params"]["provider"]
    rows.setdefault(b["group"], {})[provider] = (b["stats"]["median"] * 1e3, b["stats"]["iqr"] * 1e3,
                                                 b["extra_info"].get("peak_MiB"))
print(f"{'benchmark':70} {'provider':10} {'median ms':>10} {'IQR ms':>8} {'peak MiB':>9} {'vs ref':>7}")
for group, providers in rows.items():
    ref = providers.get("reference", (None,))[0]
    for provider, (median, iqr, peak) in sorted(providers.items(), key=lambda kv: kv[1][0]):
        ratio = f"{ref / median:6.2f}x" if ref else ""
        peak = "" if peak is None else f"{peak:9.1f}"
        print(f"{group:70} {provider:10} {median:10.3f} {iqr:8.3f} {peak:>9} {ratio:>7}")
print(f"(machine: {data['machine_info'].get('node', '?')}; device {data['benchmarks'][0]['extra_info'].get('device')}, "
      f"dtype {data['benchmarks'][0]['extra_info'].get('dtype')}; vs ref = reference median / provider median)")
EOF
echo "== triton ops: done in ${SECONDS}s, status $status (logs in $OUT)"
exit "$status"
