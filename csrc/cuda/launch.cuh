// Launch helpers shared by the CUDA kernels of simcrop (block sizing, index-type dispatch).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace simcrop {
namespace cuda {

constexpr int kThreads = 256;

// Threads of a one-block-per-patch kernel: P rounded up to a warp, at most kThreads.
inline int threads_for(int64_t P) { return static_cast<int>(std::min<int64_t>(kThreads, (P + 31) / 32 * 32)); }

// Grid of a one-block-per-patch kernel (the x dimension holds up to 2^31 - 1 blocks).
inline unsigned int blocks_for(int64_t rows) {
  TORCH_CHECK(rows > 0 && rows <= std::numeric_limits<int32_t>::max(), "simcrop: ", rows,
              " patches do not fit one CUDA grid");
  return static_cast<unsigned int>(rows);
}

// Calls f(index_t{}) with int32_t when every offset fits (cheaper division), else int64_t.
template <typename F>
void dispatch_index(bool small, F&& f) {
  if (small) return f(int32_t{});
  return f(int64_t{});
}

}  // namespace cuda
}  // namespace simcrop
