// CUDA kernels of simcrop::patchify3d, unpatchify3d, masked_patchify, masked_unpatchify (semantics: cpu/patchify.cpp).
//
// One block per patch row; the patch origin is computed once per block, each thread strides over the P values:
//   gather : out[b, k, p] = x[origin(b, n) + element_offset(p)],  n = ids_keep[b, k] or k
//   scatter: out[origin(b, n) + element_offset(p)] = in[b, s, p] if 0 <= s < K else 0,  s = slot[b, n] or n
// The [B, K, P] side is accessed fully coalesced, the volume side in runs of pz contiguous voxels (C == 1), and
// every output element is written exactly once. Launched on the current stream; no host synchronisation
// (out-of-range ids trip a device assert).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.cuh"
#include "simcrop/checks.h"
#include "simcrop/patch_index.h"

namespace simcrop {
namespace cuda {
namespace {

template <typename T, typename index_t>
__global__ void gather_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids, T* __restrict__ out,
                              PatchGeom<index_t> g, index_t K) {
  const index_t row = blockIdx.x;  // b * K + k
  const index_t b = row / K;
  const index_t n = ids ? static_cast<index_t>(ids[row]) : row - b * K;
  CUDA_KERNEL_ASSERT(n >= 0 && n < g.N && "masked_patchify: ids_keep out of range");
  const T* src = x + patch_origin(g, b, n, index_t(0));
  T* dst = out + static_cast<int64_t>(row) * g.P;
  for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) dst[p] = src[element_offset(g, p)];
}

template <typename T, typename index_t>
__global__ void scatter_kernel(const T* __restrict__ in, const int64_t* __restrict__ slot, T* __restrict__ out,
                               PatchGeom<index_t> g, index_t K) {
  const index_t i = blockIdx.x;  // b * N + n
  const index_t b = i / g.N, n = i - b * g.N;
  const int64_t s = slot ? slot[i] : static_cast<int64_t>(n);
  T* dst = out + patch_origin(g, b, n, index_t(0));
  if (s >= 0 && s < K) {  // uniform per block
    const T* src = in + (static_cast<int64_t>(b) * K + s) * g.P;
    for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) dst[element_offset(g, p)] = src[p];
  } else {
    for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) dst[element_offset(g, p)] = T(0);
  }
}

at::Tensor gather(const GatherArgs& a, const char* op) {
  TORCH_CHECK(a.x.is_cuda(), op, ": expected a CUDA tensor, got ", a.x.device());
  const c10::cuda::CUDAGuard guard(a.x.device());
  auto out = at::empty({a.B, a.K, a.g.P}, a.x.options());  // [B, K, P]
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t* ids = a.ids.defined() ? a.ids.const_data_ptr<int64_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_by_size(a.x, [&](auto tag) {
    using T = decltype(tag);
    dispatch_index(fits_int32({a.x.numel(), total}), [&](auto itag) {
      using index_t = decltype(itag);
      const auto g = geom_cast<index_t>(a.g);
      gather_kernel<T, index_t><<<blocks_for(a.B * a.K), threads_for(g.P), 0, stream>>>(
          static_cast<const T*>(a.x.const_data_ptr()), ids, static_cast<T*>(out.data_ptr()), g,
          static_cast<index_t>(a.K));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor scatter(const ScatterArgs& a, const char* op) {
  TORCH_CHECK(a.src.is_cuda(), op, ": expected a CUDA tensor, got ", a.src.device());
  const c10::cuda::CUDAGuard guard(a.src.device());
  auto out = at::empty(a.shape, a.src.options());  // [B, C, X, Y, Z]
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t* slot = a.slot.defined() ? a.slot.const_data_ptr<int64_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_by_size(a.src, [&](auto tag) {
    using T = decltype(tag);
    dispatch_index(fits_int32({a.src.numel(), total}), [&](auto itag) {
      using index_t = decltype(itag);
      const auto g = geom_cast<index_t>(a.g);
      scatter_kernel<T, index_t><<<blocks_for(a.B * a.g.N), threads_for(g.P), 0, stream>>>(
          static_cast<const T*>(a.src.const_data_ptr()), slot, static_cast<T*>(out.data_ptr()), g,
          static_cast<index_t>(a.K));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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

TORCH_LIBRARY_IMPL(simcrop, CUDA, m) {
  m.impl("patchify3d", &patchify3d);
  m.impl("unpatchify3d", &unpatchify3d);
  m.impl("masked_patchify", &masked_patchify);
  m.impl("masked_unpatchify", &masked_unpatchify);
}

}  // namespace cuda
}  // namespace simcrop
