// CPU kernels of simcrop::patchify3d, unpatchify3d, masked_patchify, masked_unpatchify.
//
// All four are one gather or one scatter of whole patches (pure data movement, so dispatched on the element size):
//   gather : out[b, k, :] = patch(x, b, n),  n = ids_keep[b, k] (masked) or k       [B, C, X, Y, Z] -> [B, K, P]
//   scatter: patch(out, b, n) = in[b, s, :] if 0 <= s < K else 0,
//            s = slot[b, n] (masked: rank of n in ids_keep, -1 if hidden) or n      [B, K, P] -> [B, C, X, Y, Z]
// Both run in parallel over patches (at::parallel_for); every output element is written exactly once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "patch_rows.h"
#include "simcrop/checks.h"

namespace simcrop {
namespace cpu {
namespace {

at::Tensor gather(const GatherArgs& a, const char* op) {
  TORCH_CHECK(a.x.device().is_cpu(), op, ": expected a CPU tensor, got ", a.x.device());
  const Geom& g = a.g;
  const int64_t K = a.K;
  auto out = at::empty({a.B, K, g.P}, a.x.options());  // [B, K, P]
  const int64_t* ids = a.ids.defined() ? a.ids.const_data_ptr<int64_t>() : nullptr;
  dispatch_by_size(a.x, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(a.x.const_data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, a.B * K, patch_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // i = b * K + k
        const int64_t n = ids ? ids[i] : i % K;
        TORCH_CHECK(n >= 0 && n < g.N, op, ": ids_keep value ", n, " out of range [0, ", g.N, ")");
        load_patch(src, g, i / K, n, dst + i * g.P);
      }
    });
  });
  return out;
}

at::Tensor scatter(const ScatterArgs& a, const char* op) {
  TORCH_CHECK(a.src.device().is_cpu(), op, ": expected a CPU tensor, got ", a.src.device());
  const Geom& g = a.g;
  const int64_t K = a.K;
  auto out = at::empty(a.shape, a.src.options());  // [B, C, X, Y, Z]
  const int64_t* slot = a.slot.defined() ? a.slot.const_data_ptr<int64_t>() : nullptr;
  dispatch_by_size(a.src, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(a.src.const_data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, a.B * g.N, patch_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // i = b * N + n
        const int64_t b = i / g.N, n = i % g.N;
        const int64_t s = slot ? slot[i] : n;
        store_patch<T>(s >= 0 && s < K ? src + (b * K + s) * g.P : nullptr, g, b, n, dst);
      }
    });
  });
  return out;
}

at::Tensor patchify3d(const at::Tensor& x, at::IntArrayRef patch) {
  return gather(prepare_gather(x, patch, nullptr, "patchify3d"), "patchify3d");
}

at::Tensor unpatchify3d(const at::Tensor& patches, at::IntArrayRef patch, at::IntArrayRef spatial, int64_t channels) {
  return scatter(prepare_unpatchify(patches, patch, spatial, channels), "unpatchify3d");
}

at::Tensor masked_patchify(const at::Tensor& x, at::IntArrayRef patch, const at::Tensor& ids_keep) {
  return gather(prepare_gather(x, patch, &ids_keep, "masked_patchify"), "masked_patchify");
}

at::Tensor masked_unpatchify(const at::Tensor& visible, at::IntArrayRef patch, const at::Tensor& ids_keep,
                             at::IntArrayRef spatial) {
  return scatter(prepare_masked_unpatchify(visible, patch, ids_keep, spatial), "masked_unpatchify");
}

}  // namespace

TORCH_LIBRARY_IMPL(simcrop, CPU, m) {
  m.impl("patchify3d", &patchify3d);
  m.impl("unpatchify3d", &unpatchify3d);
  m.impl("masked_patchify", &masked_patchify);
  m.impl("masked_unpatchify", &masked_unpatchify);
}

}  // namespace cpu
}  // namespace simcrop
