// Index math of 3D patchify, shared by the CPU (.cpp) and CUDA (.cu) kernels and the C++ unit tests.
//
// Conventions (simcrop/ops/reference.py):
//   volume  [B, C, X, Y, Z] contiguous; patch px x py x pz; grid (gx, gy, gz) = (X/px, Y/py, Z/pz)
//   patch   n = (ix * gy + iy) * gz + iz                               N = gx * gy * gz
//   element p = ((dx * py + dy) * pz + dz) * C + c   (channel last)     P = px * py * pz * C
//   voxel   (b, c, ix*px + dx, iy*py + dy, iz*pz + dz)
// Every function is inline and __host__ __device__ under nvcc, plain inline under a host compiler, so the
// CPU build and csrc/tests exercise exactly the code the CUDA kernels run.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SIMCROP_HD __host__ __device__ __forceinline__
#else
#define SIMCROP_HD inline
#endif

namespace simcrop {

// Sizes of one patchify problem; index_t is int32_t when every offset fits, else int64_t.
template <typename index_t>
struct PatchGeom {
  index_t C, X, Y, Z;     // volume channels and spatial sizes
  index_t px, py, pz;     // patch sides
  index_t gx, gy, gz;     // patch grid
  index_t N, P;           // patches per volume, values per patch
};

// Fills the grid from volume and patch sizes; the caller has checked that each side divides.
template <typename index_t>
SIMCROP_HD PatchGeom<index_t> make_geom(index_t C, index_t X, index_t Y, index_t Z, index_t px, index_t py,
                                        index_t pz) {
  PatchGeom<index_t> g;
  g.C = C; g.X = X; g.Y = Y; g.Z = Z;
  g.px = px; g.py = py; g.pz = pz;
  g.gx = X / px; g.gy = Y / py; g.gz = Z / pz;
  g.N = g.gx * g.gy * g.gz;
  g.P = px * py * pz * C;
  return g;
}

// The same geometry in another index type (int64 on the host -> int32 in a kernel when offsets fit).
template <typename to_t, typename from_t>
SIMCROP_HD PatchGeom<to_t> geom_cast(const PatchGeom<from_t>& g) {
  return make_geom<to_t>(static_cast<to_t>(g.C), static_cast<to_t>(g.X), static_cast<to_t>(g.Y),
                         static_cast<to_t>(g.Z), static_cast<to_t>(g.px), static_cast<to_t>(g.py),
                         static_cast<to_t>(g.pz));
}

// n -> (ix, iy, iz):  n = (ix * gy + iy) * gz + iz
template <typename index_t>
SIMCROP_HD void patch_coords(const PatchGeom<index_t>& g, index_t n, index_t& ix, index_t& iy, index_t& iz) {
  iz = n % g.gz;
  const index_t t = n / g.gz;
  iy = t % g.gy;
  ix = t / g.gy;
}

// p -> (dx, dy, dz, c):  p = ((dx * py + dy) * pz + dz) * C + c
template <typename index_t>
SIMCROP_HD void element_coords(const PatchGeom<index_t>& g, index_t p, index_t& dx, index_t& dy, index_t& dz,
                               index_t& c) {
  c = p % g.C;
  index_t t = p / g.C;
  dz = t % g.pz;
  t /= g.pz;
  dy = t % g.py;
  dx = t / g.py;
}

// Offset of voxel (b, c, x, y, z) in a contiguous [B, C, X, Y, Z] volume.
template <typename index_t>
SIMCROP_HD index_t voxel_offset(const PatchGeom<index_t>& g, index_t b, index_t c, index_t x, index_t y, index_t z) {
  return (((b * g.C + c) * g.X + x) * g.Y + y) * g.Z + z;
}

// Offset of the first voxel (dx = dy = dz = 0) of patch n, channel c, sample b.
template <typename index_t>
SIMCROP_HD index_t patch_origin(const PatchGeom<index_t>& g, index_t b, index_t n, index_t c) {
  index_t ix, iy, iz;
  patch_coords(g, n, ix, iy, iz);
  return voxel_offset(g, b, c, ix * g.px, iy * g.py, iz * g.pz);
}

// Offset of element p of a patch from the patch's origin (channel 0): c * XYZ + (dx * Y + dy) * Z + dz.
// The same for every patch, so kernels compute the origin once per patch and this per element.
template <typename index_t>
SIMCROP_HD index_t element_offset(const PatchGeom<index_t>& g, index_t p) {
  index_t dx, dy, dz, c;
  element_coords(g, p, dx, dy, dz, c);
  return ((c * g.X + dx) * g.Y + dy) * g.Z + dz;
}

// (b, n, p) -> voxel offset: where element p of patch n lives in the volume.
template <typename index_t>
SIMCROP_HD index_t patch_element_offset(const PatchGeom<index_t>& g, index_t b, index_t n, index_t p) {
  return patch_origin(g, b, n, index_t(0)) + element_offset(g, p);
}

// Voxel offset -> (b, n, p): the inverse of patch_element_offset (used by one-thread-per-voxel scatters).
template <typename index_t>
SIMCROP_HD void voxel_to_patch(const PatchGeom<index_t>& g, index_t offset, index_t& b, index_t& n, index_t& p) {
  const index_t z = offset % g.Z;
  index_t t = offset / g.Z;
  const index_t y = t % g.Y;
  t /= g.Y;
  const index_t x = t % g.X;
  t /= g.X;
  const index_t c = t % g.C;
  b = t / g.C;
  n = ((x / g.px) * g.gy + y / g.py) * g.gz + z / g.pz;
  p = (((x % g.px) * g.py + y % g.py) * g.pz + z % g.pz) * g.C + c;
}

}  // namespace simcrop
