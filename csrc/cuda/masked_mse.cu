// CUDA kernels of simcrop::masked_mse and masked_mse_backward (math: cpu/masked_mse.cpp).
//
// One block per patch i = b * N + n; its threads stride over the P values (reads of pred coalesced, reads of x in
// runs of pz voxels), reduce in registers + warp shuffles + one shared slot per warp. Blocks of unmasked patches
// (m == 0) exit at once (uniform branch). norm_pix adds two reductions (mean, then unbiased variance) that re-read
// the patch from L1/L2. The loss is sum(e) / D with ATen ops on the same stream: no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

// Sum of v over the block, returned to every thread (blockDim.x a multiple of 32, at most 1024).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : acc_t(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();  // shared[] is free again for the next reduction
  return v;
}

// Target of patch (b, n): t_p = x[patch_origin(b, n) + element_offset(p)]; with norm_pix, t^ = (t - mu) * rstd.
// src = x + patch origin, so t_p = src[element_offset(p)].
template <typename x_t, typename acc_t, typename index_t>
__device__ void target_stats(const x_t* __restrict__ src, const PatchGeom<index_t>& g, bool norm_pix, acc_t eps,
                             acc_t* shared, acc_t& mu, acc_t& rstd) {
  mu = 0;
  rstd = 1;
  if (!norm_pix) return;
  acc_t s = 0;
  for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) s += static_cast<acc_t>(src[element_offset(g, p)]);
  mu = block_sum(s, shared) / static_cast<acc_t>(g.P);
  acc_t ss = 0;
  for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) {
    const acc_t d = static_cast<acc_t>(src[element_offset(g, p)]) - mu;
    ss += d * d;
  }
  const acc_t var = block_sum(ss, shared) / static_cast<acc_t>(g.P - 1);  // unbiased; P == 1 gives NaN as torch
  rstd = acc_t(1) / sqrt(var + eps);
}

// e[i] = m_i * mean_p (pred[i, p] - t^_p)^2, 0 where m_i == 0.
template <typename pred_t, typename x_t, typename acc_t, typename index_t>
__global__ void mse_forward_kernel(const pred_t* __restrict__ pred, const x_t* __restrict__ x,
                                   const acc_t* __restrict__ mask, acc_t* __restrict__ err, PatchGeom<index_t> g,
                                   bool norm_pix, acc_t eps) {
  __shared__ acc_t shared[32];
  const index_t i = blockIdx.x;
  const acc_t m = mask[i];
  if (m == acc_t(0)) {  // the whole block leaves together
    if (threadIdx.x == 0) err[i] = 0;
    return;
  }
  const index_t b = i / g.N, n = i - b * g.N;
  const x_t* src = x + patch_origin(g, b, n, index_t(0));
  acc_t mu, rstd;
  target_stats(src, g, norm_pix, eps, shared, mu, rstd);
  const pred_t* row = pred + static_cast<int64_t>(i) * g.P;
  acc_t s = 0;
  for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) {
    const acc_t t = (static_cast<acc_t>(src[element_offset(g, p)]) - mu) * rstd;
    const acc_t d = static_cast<acc_t>(row[p]) - t;
    s += d * d;
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) err[i] = m * s / static_cast<acc_t>(g.P);
}

// grad[i, p] = scale * m_i * (pred[i, p] - t^_p),  scale = g * 2 / (P D) read from device memory.
template <typename pred_t, typename x_t, typename acc_t, typename index_t>
__global__ void mse_backward_kernel(const pred_t* __restrict__ pred, const x_t* __restrict__ x,
                                    const acc_t* __restrict__ mask, const acc_t* __restrict__ scale,
                                    pred_t* __restrict__ grad, PatchGeom<index_t> g, bool norm_pix, acc_t eps) {
  __shared__ acc_t shared[32];
  const index_t i = blockIdx.x;
  const acc_t m = mask[i];
  pred_t* out = grad + static_cast<int64_t>(i) * g.P;
  if (m == acc_t(0)) {
    for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) out[p] = pred_t(0);
    return;
  }
  const index_t b = i / g.N, n = i - b * g.N;
  const x_t* src = x + patch_origin(g, b, n, index_t(0));
  acc_t mu, rstd;
  target_stats(src, g, norm_pix, eps, shared, mu, rstd);
  const acc_t w = *scale * m;
  const pred_t* row = pred + static_cast<int64_t>(i) * g.P;
  for (index_t p = threadIdx.x; p < g.P; p += blockDim.x) {
    const acc_t t = (static_cast<acc_t>(src[element_offset(g, p)]) - mu) * rstd;
    out[p] = static_cast<pred_t>(w * (static_cast<acc_t>(row[p]) - t));
  }
}

// Calls f(pred_t{}, x_t{}) for pred's dtype and x's dtype (x is pred's dtype or float32, see prepare_mse).
template <typename F>
void dispatch_mse(const at::Tensor& pred, const at::Tensor& x, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "simcrop_masked_mse_cuda", [&] {
    if (x.scalar_type() == pred.scalar_type()) {
      f(scalar_t{}, scalar_t{});
    } else {
      f(scalar_t{}, float{});
    }
  });
}

at::Tensor masked_mse(const at::Tensor& pred_in, const at::Tensor& x_in, const at::Tensor& mask_in,
                      at::IntArrayRef patch, bool norm_pix, c10::string_view normalization, double eps) {
  const bool masked = by_masked(normalization);
  TORCH_CHECK(pred_in.is_cuda(), "masked_mse: expected CUDA tensors, got ", pred_in.device());
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const MseArgs a = prepare_mse(pred_in, x_in, mask_in, patch, "masked_mse");
  auto err = at::empty({a.B, a.g.N}, a.mask.options());  // e[b, n]
  if (err.numel() == 0) return divide_by_denominator(err.sum(), a.mask, masked);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_mse(a.pred, a.x, [&](auto pred_tag, auto x_tag) {
    using pred_t = decltype(pred_tag);
    using x_t = decltype(x_tag);
    using acc_t = at::opmath_type<pred_t>;
    dispatch_index(fits_int32({a.x.numel(), a.pred.numel()}), [&](auto itag) {
      using index_t = decltype(itag);
      mse_forward_kernel<pred_t, x_t, acc_t, index_t><<<blocks_for(a.B * a.g.N), threads_for(a.g.P), 0, stream>>>(
          a.pred.const_data_ptr<pred_t>(), a.x.const_data_ptr<x_t>(), a.mask.const_data_ptr<acc_t>(),
          err.data_ptr<acc_t>(), geom_cast<index_t>(a.g), norm_pix, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return divide_by_denominator(err.sum(), a.mask, masked);
}

at::Tensor masked_mse_backward(const at::Tensor& grad, const at::Tensor& pred_in, const at::Tensor& x_in,
                               const at::Tensor& mask_in, at::IntArrayRef patch, bool norm_pix,
                               c10::string_view normalization, double eps) {
  const bool masked = by_masked(normalization);
  TORCH_CHECK(pred_in.is_cuda(), "masked_mse_backward: expected CUDA tensors, got ", pred_in.device());
  TORCH_CHECK(grad.numel() == 1, "masked_mse_backward: grad must be a scalar, got shape ", grad.sizes());
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const MseArgs a = prepare_mse(pred_in, x_in, mask_in, patch, "masked_mse_backward");
  // scale = g * 2 / (P D), a 0-d device tensor (no .item(): no sync)
  const auto scale = divide_by_denominator(grad.reshape({}).to(a.mask.scalar_type()).mul(2.0 / a.g.P), a.mask,
                                           masked);
  auto out = at::empty_like(a.pred);  // [B, N, P]
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_mse(a.pred, a.x, [&](auto pred_tag, auto x_tag) {
    using pred_t = decltype(pred_tag);
    using x_t = decltype(x_tag);
    using acc_t = at::opmath_type<pred_t>;
    dispatch_index(fits_int32({a.x.numel(), a.pred.numel()}), [&](auto itag) {
      using index_t = decltype(itag);
      mse_backward_kernel<pred_t, x_t, acc_t, index_t><<<blocks_for(a.B * a.g.N), threads_for(a.g.P), 0, stream>>>(
          a.pred.const_data_ptr<pred_t>(), a.x.const_data_ptr<x_t>(), a.mask.const_data_ptr<acc_t>(),
          scale.const_data_ptr<acc_t>(), out.data_ptr<pred_t>(), geom_cast<index_t>(a.g), norm_pix,
          static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(simcrop, CUDA, m) {
  m.impl("masked_mse", &masked_mse);
  m.impl("masked_mse_backward", &masked_mse_backward);
}

}  // namespace cuda
}  // namespace simcrop
