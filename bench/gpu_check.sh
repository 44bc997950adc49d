#!/usr/bin/env bash
# GPU checks of simcrop on the lent machine (one H100/H200, torch 2.11+ with CUDA, no network, no DALI/MONAI).
#
#   bash bench/gpu_check.sh                 # every section: step, ext, triton (within GPU_CHECK_BUDGET_S)
#   bash bench/gpu_check.sh ext step        # only the named sections
#   bash bench/gpu_check.sh --dry-run       # every section's Python on the CPU at tiny shapes (make test): tests
#                                           # only collected, benchmarks one round at tiny sizes, the tables
#
# Sections: `step` (the paper-shape training step on generated tensors, batch 14, bf16: eager-reference /
# eager-auto / compiled-auto and the --grad-checkpointing variants: s/step, volumes/s, peak memory, MFU,
# host-device syncs of one compiled step; then a per-stage profile with the sync sites), `ext` (the C++/CUDA
# extension: build, CUDA tests, benchmarks), `triton` (bench/gpu_check_triton.sh). The extension is built once,
# first. Each section is a function section_<name> made of `step <name> <command...>` calls; a step's log goes to
# $RESULTS/<name>.log and a failing step does not stop the others. At the end: the table of the steps, the op
# benchmark tables of $RESULTS/bench_*.json, and last the training-step table. The run keeps to
# GPU_CHECK_BUDGET_S seconds (default 480, the issue's 8 minutes): a step case that would not fit is skipped
# and shown as such. With $OUT set (the lent machine), $OUT receives gpu_check.md (the tables) and
# gpu_check_logs.tar.gz (logs, JSON, profile) only: the machine returns at most 8 files.
# To add a section: write section_<name>, append <name> to SECTIONS.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY_RUN=0
wanted=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    *) wanted+=("$arg") ;;
  esac
done
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
if [ $DRY_RUN = 1 ]; then
  RESULTS=${RESULTS:-$ROOT/.cache/gpu_check_dry}
  export SIMCROP_BENCH_ROUNDS=1 CUDA_VISIBLE_DEVICES=""  # one round of everything; the CPU even where a GPU is
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # no OpenMP spinning against other jobs on a shared CI box
  BUDGET=100000
else
  RESULTS=${RESULTS:-$ROOT/.cache/gpu_check}
fi
mkdir -p "$RESULTS"
rm -f "$RESULTS"/bench_*.json "$RESULTS"/profile_*.md
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
export SIMCROP_CACHE=${SIMCROP_CACHE:-$ROOT/.cache/simcrop}  # the paper-shape BERT is built here once (~440 MB)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SECTIONS=(step ext triton)
STEPS=()
EXT_BUILT=0

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

left() { echo $((BUDGET - SECONDS)); }  # seconds left of the budget

fits() {  # fits <name> <seconds needed>: true if the budget has them, else record the step as skipped
  if [ "$(left)" -ge "$2" ]; then return 0; fi
  echo "== $1: skipped, $(left) s of the ${BUDGET} s budget left (needs ~$2 s)"
  STEPS+=("$1|skipped (time budget)|0")
  return 1
}

limit() {  # limit <seconds>: the smaller of it and the budget left (at least 1)
  local l
  l=$(left)
  [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"
}

# -- C++/CUDA extension (csrc/): build against this machine's torch, CUDA tests, benchmarks --------------------
build_ext() {
  # --no-deps: no network here; the build decides CUDA from torch.version.cuda + CUDA_HOME, FORCE makes it loud
  SIMCROP_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install --no-build-isolation --no-deps -e . ||
    SIMCROP_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --inplace  # old setuptools / no pip
  "$PY" -c 'from simcrop.ops.extension import has_cuda_ext, check_device as c; assert has_cuda_ext(), c("cuda"); print("simcrop._C with CUDA kernels")'
}

ensure_ext() {  # build the extension once per run (the step section needs its CUDA ops too)
  [ $EXT_BUILT = 1 ] && return 0
  EXT_BUILT=1
  if [ $DRY_RUN = 1 ]; then  # no GPU, no nvcc run here: make test compiles csrc/ on its own
    step ext_build "$PY" -c 'from simcrop.ops.extension import has_cuda_ext; print("dry run: build skipped; CUDA kernels:", has_cuda_ext())'
  else
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
    step ext_build build_ext
  fi
}

section_ext() {
  ensure_ext || return
  if [ $DRY_RUN = 1 ]; then  # the CUDA selections must exist; the CPU benchmarks of the same files at tiny size
    step ext_tests "$PY" -m pytest tests/ops/test_patchify.py tests/ops/test_masked_mse.py -m cuda -q -p no:cacheprovider --collect-only
    step ext_bench "$PY" -m pytest bench/bench_patchify.py bench/bench_masked_mse.py --benchmark-only \
      -k "cpu and tiny and (extension or reference) and not norm_pix" -q -p no:cacheprovider \
      --benchmark-json "$RESULTS/bench_ext.json" --benchmark-columns=median,iqr,min,rounds
    return
  fi
  fits ext_tests 60 && step ext_tests timeout "$(limit 150)" "$PY" -m pytest tests/ops/test_patchify.py \
    tests/ops/test_masked_mse.py -m cuda -q -p no:cacheprovider
  fits ext_bench 60 && step ext_bench timeout "$(limit 150)" "$PY" -m pytest bench/bench_patchify.py \
    bench/bench_masked_mse.py --benchmark-only -k cuda -q -p no:cacheprovider \
    --benchmark-json "$RESULTS/bench_ext.json" --benchmark-columns=median,iqr,min,rounds
}

# -- Triton ops (kernels/): bench/gpu_check_triton.sh, which writes $RESULTS/bench_triton.json -----------------------
section_triton() {
  fits triton 90 || return
  local tests bench
  tests=$(limit 150)
  bench=$(limit $((tests < 150 ? 60 : 180)))
  step triton env DRY_RUN=$DRY_RUN TRITON_TESTS_TIMEOUT="$tests" TRITON_BENCH_TIMEOUT="$bench" \
    bash bench/gpu_check_triton.sh "$RESULTS"
}

# -- the training step at the paper's shape (bench/bench_train_step.py::test_step, bench/profile_step.py) ----------
# each provider in its own process (a timeout loses one case, not the table); compiled cases also count the
# host-device syncs of one step (torch.cuda.set_sync_debug_mode, in extra_info)
STEP_PROVIDERS=${GPU_CHECK_STEP_PROVIDERS:-eager-reference,compiled-auto,eager-reference-gc,compiled-auto-gc,eager-auto}
section_step() {
  ensure_ext
  local shape=paper batch=${SIMCROP_BENCH_BATCH:-14} providers=$STEP_PROVIDERS profile_steps=3 p need
  if [ $DRY_RUN = 1 ]; then  # the same code at the tiny preset; compiled with aot_eager (no code generation)
    shape=tiny batch=${SIMCROP_BENCH_BATCH:-2} providers=eager-reference,compiled-auto,eager-auto-gc profile_steps=1
    export SIMCROP_BENCH_COMPILE_BACKEND=aot_eager
  fi
  for p in ${providers//,/ }; do
    need=45
    [[ $p == compiled-* ]] && need=150
    fits "step_$p" "$need" || continue
    step "step_$p" env SIMCROP_BENCH_BATCH="$batch" SIMCROP_BENCH_STEP_PROVIDERS="$p" \
      timeout "$(limit $((need * 2)))" "$PY" -m pytest bench/bench_train_step.py -k "test_step and $shape" \
      --benchmark-only -q -p no:cacheprovider --benchmark-json "$RESULTS/bench_step_$p.json" \
      --benchmark-columns=median,iqr,min,rounds
  done
  # where the time goes, per stage (device time on a GPU), and the host-device syncs of an eager step
  fits step_profile 40 && step step_profile env SIMCROP_BENCH_BATCH="$batch" timeout "$(limit 120)" \
    "$PY" -m bench.profile_step --shape "$shape" --data generated --provider eager-auto --steps "$profile_steps" --sync-debug \
    --out "$RESULTS/profile_${shape}.md"
}

print_tables() {
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  for s in "${STEPS[@]}"; do echo "| ${s//|/ | } |"; done
  "$PY" - "$RESULTS"/bench_*.json <<'PY'
import json, sys

def load(path):
    try:
        return json.load(open(path))["benchmarks"]
    except (OSError, ValueError, KeyError):
        return []

def provider(b):
    return b.get("params", {}).get("provider") or b["param"].split("-")[-1]

steps = []
for path in sys.argv[1:]:
    benches = load(path)
    if path.rsplit("/", 1)[-1].startswith("bench_step"):
        steps += benches
        continue
    groups = {}
    for b in benches:
        groups.setdefault(b["group"], []).append(b)
    if not groups:
        continue
    print(f"\n{path.rsplit('/', 1)[-1]}\n| group | provider | median ms | IQR ms | x vs compiled | peak MiB |")
    print("|---|---|---|---|---|---|")
    for group, items in groups.items():
        base = {provider(b): b["stats"]["median"] for b in items}.get("compiled")
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            st = b["stats"]
            ratio = f"{base / st['median']:.2f}" if base else "-"
            mem = b.get("extra_info", {}).get("peak_MiB")  # one call, above the inputs (bench/_timing.py)
            mem = f"{mem:.0f}" if mem is not None else "-"
            print(f"| {group} | {provider(b)} | {st['median'] * 1e3:.3f} | {st['iqr'] * 1e3:.3f} | {ratio} | {mem} |")

# the training step, last: one row per provider, ratios against eager-reference of the same group
if steps:
    groups = {}
    for b in steps:
        groups.setdefault(b["group"], []).append(b)
    for group, items in groups.items():
        e0 = items[0]["extra_info"]
        print(f"\nTraining step: {group}\n{e0.get('device')}, text tower {e0.get('text_tower')}, "
              f"{e0.get('visible_tokens')} visible tokens, findings / report word pieces "
              f"{e0.get('findings_tokens')} / {e0.get('report_tokens')}, model {e0.get('model_GFLOP')} GFLOP/step")
        base = {b["extra_info"]["provider"]: b for b in items}.get("eager-reference")
        print("| provider | amp | s/step | IQR s | volumes/s | x vs eager-reference | peak GiB | x peak | TFLOP/s | MFU "
              "| syncs/step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            e, st = b["extra_info"], b["stats"]
            speed = f"{base['stats']['median'] / st['median']:.2f}" if base else "-"
            peak, bpeak = e.get("peak_total_MiB"), base and base["extra_info"].get("peak_total_MiB")
            cells = [
                e["provider"], e.get("amp"), f"{st['median']:.3f}", f"{st['iqr']:.3f}",
                f"{e['batch'] / st['median']:.2f}", speed, f"{peak / 1024:.2f}" if peak else "-",
                f"{peak / bpeak:.2f}" if peak and bpeak else "-", f"{e['model_GFLOP'] / 1e3 / st['median']:.2f}",
                "-" if e.get("mfu") is None else f"{100 * e['mfu']:.1f}%",
                "-" if e.get("syncs") is None else str(e["syncs"]),
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
        sites = [f"{b['extra_info']['provider']}: {b['extra_info']['sync_sites']}" for b in items
                 if b["extra_info"].get("sync_sites")]
        if sites:
            print("sync sites (file:line x count): " + "; ".join(sites))
PY
}

[ ${#wanted[@]} -gt 0 ] || wanted=("${SECTIONS[@]}")
echo "== gpu_check: sections ${wanted[*]}$([ $DRY_RUN = 1 ] && echo ' (dry run, CPU, tiny shapes)'), results in $RESULTS"
for s in "${wanted[@]}"; do
  if declare -F "section_$s" >/dev/null; then
    "section_$s"
  else
    echo "unknown section: $s (known: ${SECTIONS[*]})"
    STEPS+=("$s|FAIL unknown section|0")
  fi
done
print_tables | tee "$RESULTS/gpu_check.md"
if [ $DRY_RUN = 0 ] && [ -n "${OUT:-}" ] && [ "$OUT" != "$RESULTS" ]; then  # the lent machine: two files back
  mkdir -p "$OUT"
  cp "$RESULTS/gpu_check.md" "$OUT/gpu_check.md"
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$RESULTS" --exclude=inductor --exclude=triton . 2>/dev/null
fi
echo "== gpu_check: ${SECONDS} s$([ $DRY_RUN = 1 ] && echo ' (dry run)')"
for s in "${STEPS[@]}"; do [[ $s == *"|ok|"* || $s == *"|skipped"* ]] || exit 1; done
