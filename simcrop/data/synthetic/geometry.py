"""Voxel grid in millimetres: the affine, coordinate axes, signed distances of tubes and spheres, smooth noise.

* Arrays are indexed ``[X, Y, Z]`` (voxel indices ``i, j, k``).
* The affine is ``diag(sx, sy, sz, 1)`` plus a translation that puts the volume centre at world (0, 0, 0) mm,
  in nibabel's RAS+ world convention: **+x = patient Right, +y = Anterior, +z = Superior**, hence
  ``nibabel.aff2axcodes(affine) == ('R', 'A', 'S')``. Increasing ``i`` moves toward the patient's RIGHT (so the
  patient's left lung lies at LOW ``i``), increasing ``j`` moves anterior (spine at low ``j``), increasing ``k``
  moves up (lung apices at high ``k``).
* Anatomy is drawn in millimetres, so any ``shape`` / ``spacing`` works (e.g. ``PAPER_SHAPE`` at
  ``PAPER_SPACING``); anatomy outside the field of view is simply cut off.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def make_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ affine [4, 4] with positive diagonal spacing and the volume centre at world (0, 0, 0) mm."""
    aff = np.eye(4)
    for d in range(3):
        aff[d, d] = float(spacing[d])
        aff[d, 3] = -(int(shape[d]) - 1) / 2.0 * float(spacing[d])
    return aff


class Axes:
    """Voxel-centre coordinates (mm) along X, Y, Z: 1-D vectors and broadcastable views.

    x: (X, 1, 1), y: (1, Y, 1), z: (1, 1, Z). Vectors must be increasing (they are: world or scaled world).
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray):
        self.xs, self.ys, self.zs = (np.asarray(v, dtype=np.float32) for v in (xs, ys, zs))
        self.x = self.xs[:, None, None]
        self.y = self.ys[None, :, None]
        self.z = self.zs[None, None, :]
        self.shape = (len(self.xs), len(self.ys), len(self.zs))

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices of the voxels whose centres lie in [lo, hi] (mm), or None if empty."""
        sl = []
        for v, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            i0 = int(np.searchsorted(v, a, "left"))
            i1 = int(np.searchsorted(v, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def sub(self, sl):
        """Broadcastable coordinate views (x, y, z) restricted to a box."""
        return self.xs[sl[0], None, None], self.ys[None, sl[1], None], self.zs[None, None, sl[2]]

    def point(self, flat_index: int) -> np.ndarray:
        i, j, k = np.unravel_index(int(flat_index), self.shape)
        return np.array([self.xs[i], self.ys[j], self.zs[k]], dtype=np.float64)


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 3] random directions."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def segment_sdf(axes: Axes, p0, p1, r0: float, r1: float):
    """Signed distance (mm, > 0 inside) to a tapered tube from p0 (radius r0) to p1 (radius r1).

    Returns (slices, sdf) restricted to the tube's bounding box, or None if it misses the grid.
    """
    p0 = np.asarray(p0, np.float32)
    p1 = np.asarray(p1, np.float32)
    rmax = max(r0, r1) + 8.0
    sl = axes.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if sl is None:
        return None
    x, y, z = axes.sub(sl)
    d = p1 - p0
    l2 = max(float(d @ d), 1e-6)
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / l2
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
    return sl, (r0 + (r1 - r0) * t) - dist


def draw_polyline_label(axes: Axes, points, radii, target: np.ndarray, value: int | bool) -> None:
    """Set target[...] = value where a voxel centre lies inside the tube through points (radii per point)."""
    for a in range(len(points) - 1):
        res = segment_sdf(axes, points[a], points[a + 1], radii[a], radii[a + 1])
        if res is not None:
            sl, sdf = res
            target[sl][sdf >= 0] = value


def union_sdf(w: Axes, center: np.ndarray, R: float, offsets: np.ndarray, radii: np.ndarray):
    """Signed distance (mm, > 0 inside) of a union of spheres around center; (slices, sdf) or None.

    offsets: (n, 3) in units of R; radii: (n,) in units of R. A sphere of radius radii[0] is always at the centre.
    """
    reach = R * float(np.max(np.linalg.norm(offsets, axis=1) + radii)) + 8.0
    sl = w.box(center - reach, center + reach)
    if sl is None:
        return None
    x, y, z = w.sub(sl)
    sdf = None
    for o, r in zip(offsets, radii):
        p = center + o * R
        s = r * R - np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2)
        sdf = s if sdf is None else np.maximum(sdf, s)
    return sl, sdf


def smooth_noise(rng: np.random.Generator, axes: Axes, scale_mm: float) -> np.ndarray:
    """Smooth random field [X, Y, Z] (float32, ~unit std): Gaussian nodes every scale_mm, cosine-interpolated."""
    mats = []
    for v in (axes.xs, axes.ys, axes.zs):
        pos = (v - v[0]) / scale_mm  # position in node units
        n_nodes = int(np.floor(pos[-1])) + 2
        i0 = np.floor(pos).astype(np.int64)
        f = pos - i0
        f = (1.0 - np.cos(np.pi * f)) / 2.0
        w = np.zeros((len(v), n_nodes), np.float32)
        w[np.arange(len(v)), i0] = 1.0 - f
        w[np.arange(len(v)), i0 + 1] += f
        mats.append(w)
    nodes = rng.standard_normal(tuple(m.shape[1] for m in mats)).astype(np.float32)
    out = np.einsum("ia,jb,kc,abc->ijk", mats[0], mats[1], mats[2], nodes, optimize=True)
    return (out / max(float(out.std()), 1e-6)).astype(np.float32)
