// Unit tests of the patch index math (csrc/include/simcrop/patch_index.h), compiled by a plain host compiler:
// the same inline functions the CPU and CUDA kernels call. No dependencies; exit status 0 = pass.
//   cmake -S . -B build && cmake --build build && ctest --test-dir build       (or: g++ -std=c++17 -I csrc/include)
#include <cstdint>
#include <cstdio>
#include <vector>

#include "simcrop/patch_index.h"

namespace {

int failures = 0;

#define EXPECT_EQ(a, b)                                                                                  \
  do {                                                                                                   \
    const long long va = static_cast<long long>(a), vb = static_cast<long long>(b);                      \
    if (va != vb) {                                                                                      \
      std::printf("%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__, #a, #b, va, vb);         \
      if (++failures > 20) return;                                                                       \
    }                                                                                                    \
  } while (0)

struct Case {
  int64_t B, C, X, Y, Z, px, py, pz;
};

// Every (b, n, p) maps to the voxel the reference's reshape/permute picks, and voxel_to_patch inverts it.
template <typename index_t>
void check_case(const Case& k) {
  using simcrop::PatchGeom;
  const PatchGeom<index_t> g = simcrop::make_geom<index_t>(k.C, k.X, k.Y, k.Z, k.px, k.py, k.pz);
  const int64_t gx = k.X / k.px, gy = k.Y / k.py, gz = k.Z / k.pz;
  EXPECT_EQ(g.gx, gx);
  EXPECT_EQ(g.gy, gy);
  EXPECT_EQ(g.gz, gz);
  EXPECT_EQ(g.N, gx * gy * gz);
  EXPECT_EQ(g.P, k.px * k.py * k.pz * k.C);
  const int64_t volume = k.B * k.C * k.X * k.Y * k.Z;
  std::vector<int> seen(volume, 0);
  for (int64_t b = 0; b < k.B; ++b)
    for (int64_t ix = 0; ix < gx; ++ix)
      for (int64_t iy = 0; iy < gy; ++iy)
        for (int64_t iz = 0; iz < gz; ++iz) {
          const int64_t n = (ix * gy + iy) * gz + iz;
          index_t cx, cy, cz;
          simcrop::patch_coords(g, static_cast<index_t>(n), cx, cy, cz);
          EXPECT_EQ(cx, ix);
          EXPECT_EQ(cy, iy);
          EXPECT_EQ(cz, iz);
          int64_t p = 0;  // (dx, dy, dz, c) in this order, channel last
          for (int64_t dx = 0; dx < k.px; ++dx)
            for (int64_t dy = 0; dy < k.py; ++dy)
              for (int64_t dz = 0; dz < k.pz; ++dz)
                for (int64_t c = 0; c < k.C; ++c, ++p) {
                  const int64_t want =
                      (((b * k.C + c) * k.X + ix * k.px + dx) * k.Y + iy * k.py + dy) * k.Z + iz * k.pz + dz;
                  const index_t got = simcrop::patch_element_offset(g, static_cast<index_t>(b),
                                                                    static_cast<index_t>(n), static_cast<index_t>(p));
                  EXPECT_EQ(got, want);
                  index_t b2, n2, p2;
                  simcrop::voxel_to_patch(g, static_cast<index_t>(want), b2, n2, p2);
                  EXPECT_EQ(b2, b);
                  EXPECT_EQ(n2, n);
                  EXPECT_EQ(p2, p);
                  if (want >= 0 && want < volume) ++seen[want];
                }
        }
  for (int64_t v = 0; v < volume; ++v) EXPECT_EQ(seen[v], 1);  // a bijection: each voxel in exactly one patch
}

void check_geom_cast() {
  const auto g64 = simcrop::make_geom<int64_t>(2, 224, 224, 112, 16, 16, 8);
  const auto g32 = simcrop::geom_cast<int32_t>(g64);
  EXPECT_EQ(g32.N, 2744);
  EXPECT_EQ(g32.P, 4096);
  EXPECT_EQ(g32.gz, 14);
  EXPECT_EQ(simcrop::patch_origin<int32_t>(g32, 1, 2743, 1), simcrop::patch_origin<int64_t>(g64, 1, 2743, 1));
}

}  // namespace

int main() {
  const Case cases[] = {
      {2, 5, 6, 15, 8, 2, 3, 4},  // the odd shape of the Python tests
      {3, 1, 7, 9, 11, 7, 3, 1},  // non-cubic grid, 1-voxel runs
      {1, 1, 16, 16, 8, 16, 16, 8},  // a single patch
      {2, 2, 4, 6, 10, 1, 1, 1},  // 1-voxel patches
      {1, 3, 12, 4, 9, 4, 4, 3},
  };
  for (const auto& k : cases) {
    check_case<int64_t>(k);
    check_case<int32_t>(k);
  }
  check_geom_cast();
  if (failures) {
    std::printf("test_patch_index: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_patch_index: ok\n");
  return 0;
}
