// CPU building blocks: copy one patch between a contiguous volume [B, C, X, Y, Z] and a contiguous patch row [P].
// A patch is px * py * C runs of pz voxels contiguous in the volume; with C == 1 the row is contiguous too,
// so the inner loops are straight copies the compiler vectorises.
#pragma once

#include <cstdint>
#include <cstring>

#include "simcrop/patch_index.h"

namespace simcrop {
namespace cpu {

using Geom = PatchGeom<int64_t>;

// dst[p] = D(x[b, c, ix*px + dx, iy*py + dy, iz*pz + dz]),  p = ((dx * py + dy) * pz + dz) * C + c
template <typename S, typename D>
inline void load_patch(const S* x, const Geom& g, int64_t b, int64_t n, D* dst) {
  for (int64_t c = 0; c < g.C; ++c) {
    const S* origin = x + patch_origin(g, b, n, c);
    for (int64_t dx = 0; dx < g.px; ++dx) {
      for (int64_t dy = 0; dy < g.py; ++dy) {
        const S* src = origin + (dx * g.Y + dy) * g.Z;  // run of pz voxels
        D* d = dst + (dx * g.py + dy) * g.pz * g.C + c;
        if (g.C == 1) {
          for (int64_t dz = 0; dz < g.pz; ++dz) d[dz] = static_cast<D>(src[dz]);
        } else {
          for (int64_t dz = 0; dz < g.pz; ++dz) d[dz * g.C] = static_cast<D>(src[dz]);
        }
      }
    }
  }
}

// The inverse: x[b, c, ...] = src[p] over patch n; with src == nullptr the patch is zero-filled.
template <typename T>
inline void store_patch(const T* src, const Geom& g, int64_t b, int64_t n, T* x) {
  for (int64_t c = 0; c < g.C; ++c) {
    T* origin = x + patch_origin(g, b, n, c);
    for (int64_t dx = 0; dx < g.px; ++dx) {
      for (int64_t dy = 0; dy < g.py; ++dy) {
        T* d = origin + (dx * g.Y + dy) * g.Z;  // run of pz voxels
        if (src == nullptr) {
          std::memset(static_cast<void*>(d), 0, sizeof(T) * g.pz);
          continue;
        }
        const T* s = src + (dx * g.py + dy) * g.pz * g.C + c;
        if (g.C == 1) {
          for (int64_t dz = 0; dz < g.pz; ++dz) d[dz] = s[dz];
        } else {
          for (int64_t dz = 0; dz < g.pz; ++dz) d[dz] = s[dz * g.C];
        }
      }
    }
  }
}

// Patches per parallel_for grain: about 32 K values per task.
inline int64_t patch_grain(const Geom& g) { return g.P >= 32768 ? 1 : 32768 / g.P; }

}  // namespace cpu
}  // namespace simcrop
