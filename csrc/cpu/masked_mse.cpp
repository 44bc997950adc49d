// CPU kernels of simcrop::masked_mse and masked_mse_backward: the MIM loss read straight from the volume.
//
// Per patch (b, n) with weight m = mask[b, n] (1 = hidden), target t = patch n of x (values p = 0..P-1):
//   norm_pix:  mu = mean_p t,  var = sum_p (t - mu)^2 / (P - 1),  t^ = (t - mu) / sqrt(var + eps)   (else t^ = t)
//   e[b, n]  = m * mean_p (pred[b, n, p] - t^_p)^2
//   loss     = sum_bn e / D,   D = max(sum mask, 1) ('masked') or B * N ('all')
//   dloss/dpred[b, n, p] = g * 2 m (pred - t^_p) / (P D)
// Patches with m == 0 are skipped (e = 0, gradient 0): unlike the reference, NaN/Inf in pred or x there does not
// reach the loss. Accumulation in float32 (float64 for float64 pred); each patch's target is gathered once into
// a contiguous buffer, so the passes over it vectorise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "patch_rows.h"
#include "simcrop/checks.h"

namespace simcrop {
namespace cpu {
namespace {

// Replaces t by t^ (norm_pix) in place: t = (t - mu) / sqrt(var + eps), unbiased var as the reference.
template <typename acc_t>
inline void normalize_patch(acc_t* t, int64_t P, acc_t eps) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < P; ++p) sum += t[p];
  const acc_t mu = sum / static_cast<acc_t>(P);
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t p = 0; p < P; ++p) ss += (t[p] - mu) * (t[p] - mu);
  const acc_t rstd = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(P - 1) + eps);  // P == 1: NaN, as torch.var
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) t[p] = (t[p] - mu) * rstd;
}

// Calls f(pred_t{}, x_t{}) for pred's dtype and x's dtype (x is pred's dtype or float32, see prepare_mse).
template <typename F>
void dispatch_mse(const at::Tensor& pred, const at::Tensor& x, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "simcrop_masked_mse", [&] {
    if (x.scalar_type() == pred.scalar_type()) {
      f(scalar_t{}, scalar_t{});
    } else {
      f(scalar_t{}, float{});
    }
  });
}

// Runs body(i, target_row) for each patch i = b * N + n with mask != 0, target gathered (and normalised).
template <typename acc_t, typename x_t, typename Body>
void for_each_masked_patch(const x_t* x, const acc_t* mask, const Geom& g, int64_t B, bool norm_pix, double eps,
                           Body&& body) {
  at::parallel_for(0, B * g.N, patch_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> t(g.P);  // one target row per task
    for (int64_t i = begin; i < end; ++i) {
      if (mask[i] == acc_t(0)) {
        body(i, static_cast<const acc_t*>(nullptr));
        continue;
      }
      load_patch(x, g, i / g.N, i % g.N, t.data());
      if (norm_pix) normalize_patch(t.data(), g.P, static_cast<acc_t>(eps));
      body(i, static_cast<const acc_t*>(t.data()));
    }
  });
}

at::Tensor masked_mse(const at::Tensor& pred_in, const at::Tensor& x_in, const at::Tensor& mask_in,
                      at::IntArrayRef patch, bool norm_pix, c10::string_view normalization, double eps) {
  const bool masked = by_masked(normalization);
  TORCH_CHECK(pred_in.device().is_cpu(), "masked_mse: expected CPU tensors, got ", pred_in.device());
  const MseArgs a = prepare_mse(pred_in, x_in, mask_in, patch, "masked_mse");
  const Geom& g = a.g;
  auto err = at::empty({a.B, g.N}, a.mask.options());  // e[b, n] in the accumulation dtype
  dispatch_mse(a.pred, a.x, [&](auto pred_tag, auto x_tag) {
    using pred_t = decltype(pred_tag);
    using x_t = decltype(x_tag);
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* pred = a.pred.const_data_ptr<pred_t>();
    const acc_t* mask = a.mask.const_data_ptr<acc_t>();
    acc_t* e = err.data_ptr<acc_t>();
    for_each_masked_patch<acc_t>(a.x.const_data_ptr<x_t>(), mask, g, a.B, norm_pix, eps,
                                 [&](int64_t i, const acc_t* t) {
                                   if (t == nullptr) {
                                     e[i] = 0;
                                     return;
                                   }
                                   const pred_t* pr = pred + i * g.P;
                                   acc_t s = 0;
#pragma omp simd reduction(+ : s)
                                   for (int64_t p = 0; p < g.P; ++p) {
                                     const acc_t d = static_cast<acc_t>(pr[p]) - t[p];
                                     s += d * d;
                                   }
                                   e[i] = mask[i] * s / static_cast<acc_t>(g.P);
                                 });
  });
  return divide_by_denominator(err.sum(), a.mask, masked);
}

at::Tensor masked_mse_backward(const at::Tensor& grad, const at::Tensor& pred_in, const at::Tensor& x_in,
                               const at::Tensor& mask_in, at::IntArrayRef patch, bool norm_pix,
                               c10::string_view normalization, double eps) {
  const bool masked = by_masked(normalization);
  TORCH_CHECK(pred_in.device().is_cpu(), "masked_mse_backward: expected CPU tensors, got ", pred_in.device());
  const MseArgs a = prepare_mse(pred_in, x_in, mask_in, patch, "masked_mse_backward");
  TORCH_CHECK(grad.numel() == 1, "masked_mse_backward: grad must be a scalar, got shape ", grad.sizes());
  const Geom& g = a.g;
  // scale = g * 2 / (P D): one 0-d tensor in the accumulation dtype
  const auto scale = divide_by_denominator(grad.reshape({}).to(a.mask.scalar_type()).mul(2.0 / g.P), a.mask, masked);
  auto out = at::empty_like(a.pred);
  dispatch_mse(a.pred, a.x, [&](auto pred_tag, auto x_tag) {
    using pred_t = decltype(pred_tag);
    using x_t = decltype(x_tag);
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* pred = a.pred.const_data_ptr<pred_t>();
    const acc_t* mask = a.mask.const_data_ptr<acc_t>();
    const acc_t sc = *scale.const_data_ptr<acc_t>();
    pred_t* gp = out.data_ptr<pred_t>();
    for_each_masked_patch<acc_t>(a.x.const_data_ptr<x_t>(), mask, g, a.B, norm_pix, eps,
                                 [&](int64_t i, const acc_t* t) {
                                   pred_t* o = gp + i * g.P;
                                   if (t == nullptr) {
                                     std::fill(o, o + g.P, pred_t(0));
                                     return;
                                   }
                                   const pred_t* pr = pred + i * g.P;
                                   const acc_t w = sc * mask[i];  // 2 g m / (P D)
#pragma omp simd
                                   for (int64_t p = 0; p < g.P; ++p) {
                                     o[p] = static_cast<pred_t>(w * (static_cast<acc_t>(pr[p]) - t[p]));
                                   }
                                 });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(simcrop, CPU, m) {
  m.impl("masked_mse", &masked_mse);
  m.impl("masked_mse_backward", &masked_mse_backward);
}

}  // namespace cpu
}  // namespace simcrop
